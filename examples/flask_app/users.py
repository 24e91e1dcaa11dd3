"""The example's data, shared by the Flask app and its port: users (name -> password hash)."""

from werkzeug.security import generate_password_hash

USERS = {"ada": generate_password_hash("lovelace", method="pbkdf2:sha256:1000")}
NOTES = ["Buy milk", "Port /api/notes to Quart", "Mount the Flask app", "Read the migration guide"]
