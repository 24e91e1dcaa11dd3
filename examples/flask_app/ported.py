"""`legacy.py` ported to Quart: the same routes as a blueprint of chatbot's own app.

    chatbot serve ported:app                        # Procfile.ported
    WSGI_APP=legacy:app chatbot serve ported:app    # Procfile.port: ported routes win, the rest
                                                    # still goes to the Flask app

What changed, route by route: `async def`; `await` on the request body (`request.form`,
`request.files`), on `render_template` and on `flash`; `url_for(".login")` inside a blueprint;
Flask-Login replaced by `auth.py`. The session cookie is the same: set SECRET_KEY to the key the
Flask app uses.
"""

import hashlib

from auth import current_user, login_required, login_user, logout_user, protect_session
from quart import Blueprint, flash, jsonify, redirect, render_template, request, url_for
from users import NOTES, USERS
from werkzeug.security import check_password_hash

from chatbot import create_app, protected

blueprint = Blueprint("notes", __name__, template_folder="templates")
blueprint.app_context_processor(protect_session)


@blueprint.route("/")
@login_required
async def home():
    return await render_template("home.html", name=current_user())


@blueprint.route("/login", methods=["GET", "POST"])
async def login():
    if request.method == "GET":
        return await render_template("login.html")
    form = await request.form
    name = form.get("name", "")
    if name not in USERS or not check_password_hash(USERS[name], form.get("password", "")):
        return await render_template("login.html", error="Wrong name or password.", name=name), 401
    login_user(name)
    target = request.args.get("next", "")
    return redirect(target if target.startswith("/") and not target.startswith("//") else "/")


@blueprint.post("/logout")
async def logout():
    logout_user()
    await flash("You are logged out.")
    return redirect(url_for(".login"))


@blueprint.get("/api/notes")
@protected  # ACCESS_TOKEN (when set) and RATE_LIMIT_IP, as chatbot's own POST /chat
@login_required
async def notes():
    query = request.args.get("q", "").lower()
    limit = request.args.get("limit", 10, type=int)
    if not 1 <= limit <= 50:
        return jsonify(error="limit must be 1-50"), 400
    found = [note for note in NOTES if query in note.lower()][:limit]
    return jsonify(user=current_user(), query=query, notes=found)


@blueprint.post("/upload")
@login_required
async def upload():
    sent = (await request.files).get("file")
    if sent is None or not sent.filename:
        return jsonify(error="no file"), 400
    data = sent.read()
    return jsonify(name=sent.filename, bytes=len(data), sha256=hashlib.sha256(data).hexdigest())


@blueprint.app_errorhandler(404)
async def not_found(error):
    return await render_template("404.html", path=request.path), 404


@blueprint.app_errorhandler(413)
async def too_large(error):
    return jsonify(error="file too large (1 MiB at most)"), 413


app = create_app()  # reads the settings (SECRET_KEY, CHAT_PAGE_PATH, ...) from the environment
app.config["MAX_CONTENT_LENGTH"] = 1024 * 1024  # the upload's limit; chatbot's is 64 KiB
app.register_blueprint(blueprint)
