import os

from flask import Flask

app = Flask(__name__)


@app.get("/")
def index():
    return {"framework": "flask", "worker": os.environ.get("CLUSTERCTL_WORKER_ID"), "pid": os.getpid()}


@app.get("/teapot")
def teapot():
    return "short and stout", 418
