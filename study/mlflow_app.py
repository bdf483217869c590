"""MLflow's own server app, opening in its model-training view: an MLflow app plugin (entry point group `mlflow.app`,
name APP_NAME in pyproject.toml), which `study ui` starts as `mlflow ui --app-name cnn-study`, and which any
`mlflow server --app-name cnn-study` of an environment where this project is installed can use too.

MLflow 3 (3.18 here) shows a page in its model-training view or its GenAI view by the `workflowType` of the page's
address, else by the choice its sidebar switch stored in the browser's local storage for the server's origin
(key `mlflow.workflowType_v1`, the JSON of "machine_learning" or "genai"), else GenAI; the server has no setting
for it. This app serves MLflow's page with a script that stores the model-training choice before MLflow's own script
reads it, in a browser that has no choice stored yet: a user's later click on the switch stays theirs.

Imports MLflow only (no torch): the `mlflow ui` process loads it to see whether it is a factory."""

from __future__ import annotations

import json
from pathlib import Path

APP_NAME = "cnn-study"
MODEL_TRAINING = "machine_learning"  # MLflow's workflowType of its model-training view
WORKFLOW_KEY = "mlflow.workflowType_v1"  # where MLflow's UI keeps the view chosen in its sidebar (useLocalStorage, version 1)
DEFAULT_VIEW = f"<script>if(localStorage.getItem({json.dumps(WORKFLOW_KEY)})===null)localStorage.setItem({json.dumps(WORKFLOW_KEY)},{json.dumps(json.dumps(MODEL_TRAINING))})</script>"


def create_app():
    """MLflow's Flask app with its page (every address of the UI is `/` plus a `#/...` route) carrying DEFAULT_VIEW;
    under uvicorn, `mlflow server`'s default, the FastAPI app MLflow wraps around that same Flask app, as MLflow's
    own basic-auth plugin returns."""
    from flask import Response
    from mlflow.environment_variables import _MLFLOW_SGI_NAME
    from mlflow.server import app

    page = Path(app.static_folder, "index.html")
    if page.exists():  # else MLflow's own page explains a build without its UI
        html = page.read_text(encoding="utf-8")
        if "</head>" not in html:
            raise RuntimeError(f"{page} has no </head> to put the model-training default before: MLflow's page changed")
        html = html.replace("</head>", f"{DEFAULT_VIEW}</head>", 1)

        def serve_in_model_training():
            # A fresh response, without the file's ETag: no browser keeps MLflow's page without the script.
            return Response(html, mimetype="text/html")

        app.view_functions["serve"] = serve_in_model_training
    if _MLFLOW_SGI_NAME.get() == "uvicorn":
        from mlflow.server.fastapi_app import app as fastapi_app

        return fastapi_app
    return app
