"""``python -m registry.serve -m models:/<name>/Production -p 5001``: MLflow's scoring server, with a 4xx for every
malformed request.

The same app ``mlflow models serve --env-manager local`` runs (``/invocations``, ``/ping``, ``/health``,
``/version``, the same request and response formats), plus one rule in front of it: a request without a
``Content-Type`` gets HTTP 415 naming the types to use. MLflow's own server answers that request with 500
(``content_type.split`` on None). ``mlflow models serve`` still serves the model; it only lacks this rule.
"""

from __future__ import annotations

import argparse

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


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    # -h is the host, as in `mlflow models serve`; help is --help only.
    parser = argparse.ArgumentParser(
        description="Serve a registered model like `mlflow models serve`, answering every malformed request with 4xx.", add_help=False
    )
    parser.add_argument("--help", action="help", help="show this help and exit")
    parser.add_argument(
        "-m", "--model-uri", required=True, help="e.g. models:/brain-tumor-student/Production (MLFLOW_TRACKING_URI says where)"
    )
    parser.add_argument("-h", "--host", default="127.0.0.1")
    parser.add_argument("-p", "--port", type=int, default=5001)
    args = parser.parse_args(argv)
    uvicorn.run(scoring_app(args.model_uri), host=args.host, port=args.port)


if __name__ == "__main__":
    main()
