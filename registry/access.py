"""The team server's creation rule: only users the admin granted it create experiments and registered models.

MLflow's basic-auth app lets every logged-in user create (it only gates creation when workspaces are on),
so a read-only user could claim ``brain-tumor-student`` before the team does. This module is the server's
``authorization_function``: MLflow's own basic-auth login, plus one rule for the two create routes. The
grant is the one MLflow itself requires for creating when workspaces are enabled, a workspace-wide USE or
MANAGE on a role, managed by the admin with MLflow's client API::

    auth = mlflow.server.get_app_client("basic-auth", tracking_uri=URL)
    role = auth.create_role("default", "creators")
    auth.add_role_permission(role.id, "workspace", "*", "USE")
    auth.assign_role("alice", role.id)      # auth.unassign_role(...) takes it back

Admins create without a grant. Runs, versions and tags still follow MLflow's per-resource permissions.
"""

from __future__ import annotations

import re

from flask import Response, make_response, request
from mlflow.server import auth as basic_auth
from mlflow.utils.workspace_utils import DEFAULT_WORKSPACE_NAME

CREATE_ROUTE = re.compile(r"/(?:ajax-)?api/[\d.]+/mlflow/(?:experiments|registered-models)/create$")


def may_create(username: str) -> bool:
    """Admins, and users holding a workspace-wide USE or MANAGE grant through any of their roles."""
    if basic_auth.store.get_user(username).is_admin:
        return True
    granted = basic_auth.store.get_role_workspace_permission(DEFAULT_WORKSPACE_NAME, username)
    return granted is not None and granted.can_use


def authenticate_request():
    """MLflow's basic-auth login; then a create request from a user without the grant is answered 403."""
    authorization = basic_auth.authenticate_request_basic_auth()
    if isinstance(authorization, Response) or request.method != "POST" or not CREATE_ROUTE.search(request.path):
        return authorization
    if may_create(authorization.username):
        return authorization
    what = "experiments" if "/experiments/" in request.path else "registered models"
    return make_response(
        f"Permission denied: {authorization.username!r} may not create {what}; ask the admin for a role with a workspace-wide USE grant",
        403,
    )
