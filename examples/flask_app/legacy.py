"""The Flask app before the migration: as its users wrote it, and as chatbot mounts it unchanged.

Login with Flask-Login (the user id in `flask.session`), a Jinja template with a form, a JSON API
reading `request.args`, a file upload and the app's own error pages. Run it alone with
`flask --app legacy run`, under chatbot with `WSGI_APP=legacy:app chatbot serve` (Procfile.mount).
`ported.py` is the same app on Quart, as a blueprint of chatbot's app.
"""

import hashlib
import os

from flask import Flask, flash, jsonify, redirect, render_template, request, url_for
from flask_login import (
    LoginManager,
    UserMixin,
    current_user,
    login_required,
    login_user,
    logout_user,
)
from users import NOTES, USERS
from werkzeug.security import check_password_hash

app = Flask(__name__)
app.secret_key = os.environ["SECRET_KEY"]  # the same key lets the Quart port read the cookie
app.config["MAX_CONTENT_LENGTH"] = 1024 * 1024
login_manager = LoginManager(app)


class User(UserMixin):
    def __init__(self, name):
        self.id = name


@login_manager.user_loader
def load_user(name):
    return User(name) if name in USERS else None


@login_manager.unauthorized_handler
def unauthorized():
    if request.path.startswith("/api/"):
        return jsonify(error="log in first"), 401
    flash("Please log in to see this page.")
    return redirect(url_for("login", next=request.path))


@app.route("/")
@login_required
def home():
    return render_template("home.html", name=current_user.id)


@app.route("/login", methods=["GET", "POST"])
def login():
    if request.method == "GET":
        return render_template("login.html")
    name = request.form.get("name", "")
    if name not in USERS or not check_password_hash(USERS[name], request.form.get("password", "")):
        return render_template("login.html", error="Wrong name or password.", name=name), 401
    login_user(User(name))
    target = request.args.get("next", "")
    return redirect(target if target.startswith("/") and not target.startswith("//") else "/")


@app.post("/logout")
def logout():
    logout_user()
    flash("You are logged out.")
    return redirect(url_for("login"))


@app.get("/api/notes")
@login_required
def notes():
    query = request.args.get("q", "").lower()
    limit = request.args.get("limit", 10, type=int)
    if not 1 <= limit <= 50:
        return jsonify(error="limit must be 1-50"), 400
    found = [note for note in NOTES if query in note.lower()][:limit]
    return jsonify(user=current_user.id, query=query, notes=found)


@app.post("/upload")
@login_required
def upload():
    sent = request.files.get("file")
    if sent is None or not sent.filename:
        return jsonify(error="no file"), 400
    data = sent.read()
    return jsonify(name=sent.filename, bytes=len(data), sha256=hashlib.sha256(data).hexdigest())


@app.errorhandler(404)
def not_found(error):
    return render_template("404.html", path=request.path), 404


@app.errorhandler(413)
def too_large(error):
    return jsonify(error="file too large (1 MiB at most)"), 413
