"""The pre-migration Flask app, kept as the contract reference and the benchmark baseline.

This is the synchronous app that `chatbot` replaced, as its users wrote it: a module-level
`app`, one blocking `openai.OpenAI` client created at import time from the environment, a page
with a chat form and a stateless `POST /chat`. It deliberately does not import `chatbot`.
tests/test_flask_contract.py runs the same requests against it and the new Quart app; the
benchmarks serve it with ``gunicorn -w 4 bench.flask_app:app``.

Environment: OPENAI_API_KEY (required by the SDK), OPENAI_BASE_URL, OPENAI_MODEL, SYSTEM_PROMPT.
"""

import os

from flask import Flask, jsonify, render_template_string, request
from openai import OpenAI

app = Flask(__name__)
client = OpenAI()  # reads OPENAI_API_KEY and OPENAI_BASE_URL
MODEL = os.environ.get("OPENAI_MODEL", "gpt-4.1-mini")  # = chatbot.settings.DEFAULT_MODEL
SYSTEM_PROMPT = os.environ.get("SYSTEM_PROMPT", "You are a helpful assistant. Answer concisely.")

PAGE = """<!doctype html>
<html lang="en">
<head><meta charset="utf-8"><title>Chatbot</title></head>
<body>
  <div id="log"></div>
  <form id="chat">
    <input id="message" name="message" autocomplete="off" placeholder="Say something">
    <button>Send</button>
  </form>
  <script>
    const form = document.getElementById("chat"), input = document.getElementById("message");
    const log = document.getElementById("log");
    function say(who, text) {
      const p = document.createElement("p");
      p.textContent = who + ": " + text;
      log.appendChild(p);
    }
    form.addEventListener("submit", async (event) => {
      event.preventDefault();
      const message = input.value;
      input.value = "";
      say("You", message);
      const reply = await fetch("/chat", {
        method: "POST",
        headers: {"Content-Type": "application/json"},
        body: JSON.stringify({message}),
      });
      const data = await reply.json();
      say("Bot", data.response ?? data.error);
    });
  </script>
</body>
</html>
"""


@app.route("/")
def index():
    return render_template_string(PAGE)


@app.route("/chat", methods=["POST"])
def chat():
    data = request.get_json(silent=True) or request.form
    message = data.get("message")
    if not message:
        return jsonify({"error": "Message is required"}), 400
    completion = client.chat.completions.create(
        model=MODEL,
        messages=[
            {"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": message},
        ],
    )
    return jsonify({"response": completion.choices[0].message.content})


if __name__ == "__main__":
    app.run()
