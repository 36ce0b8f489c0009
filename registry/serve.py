"""``kd serve -m models:/<name>/Production -p 5001``: MLflow's scoring server, with a 4xx for every
malformed request.

The same app ``mlflow models serve --env-manager local`` runs (``/invocations``, ``/ping``, ``/health``,
``/version``, the same request and response formats), plus one rule in front of it: a request without a
``Content-Type`` gets HTTP 415 naming the types to use. MLflow's own server answers that request with 500
(``content_type.split`` on None). ``mlflow models serve`` still serves the model; it only lacks this rule.
"""

from __future__ import annotations

from mlflow.pyfunc import load_model, scoring_server

MISSING_CONTENT_TYPE = "missing Content-Type header: send application/json (or text/csv, application/x-parquet)"


def scoring_app(model_uri: str):
    """MLflow's scoring app for the model, behind a check that every ``/invocations`` request names its type."""
    from starlette.responses import PlainTextResponse

    app = scoring_server.init(load_model(model_uri))

    @app.middleware("http")
    async def require_content_type(request, call_next):
        if request.url.path.rstrip("/") == "/invocations" and "content-type" not in request.headers:
            return PlainTextResponse(MISSING_CONTENT_TYPE, status_code=415)
        return await call_next(request)

    return app


def serve(model_uri: str, host: str, port: int) -> None:
    """Serve the model at ``model_uri`` on ``host:port`` until stopped."""
    import uvicorn

    uvicorn.run(scoring_app(model_uri), host=host, port=port)
