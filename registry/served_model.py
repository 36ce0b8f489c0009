"""The served model's code. MLflow runs this file to build the pyfunc when the model loads ("models from
code"), so a registered model carries code and a safe-mode Keras file, and no pickle."""

import mlflow

from registry.model import StudentClassifier

mlflow.models.set_model(StudentClassifier())
