import hashlib
import os

from flask import Flask, request

app = Flask(__name__)


@app.get("/")
def index():
    return {"framework": "flask", "worker": os.environ.get("CLUSTERCTL_WORKER_ID"), "pid": os.getpid()}


@app.get("/teapot")
def teapot():
    return "short and stout", 418


@app.post("/digest")
def digest():
    body = request.get_data()
    return {"length": len(body), "sha256": hashlib.sha256(body).hexdigest()}
