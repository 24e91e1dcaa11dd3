"""A legacy Flask view that blocks, as views calling OpenAI synchronously do: the app
`bench.legacy_mount` mounts with WSGI_APP=bench.legacy_slow:app.

`GET /slow?s=2&cpu_ms=0` sleeps `s` seconds (a blocking call: the GIL is released) after
spending `cpu_ms` of CPU in Python (template rendering, JSON: the GIL is held), then renders a
small page.
"""

import time

from flask import Flask, render_template_string, request

app = Flask(__name__)

PAGE = "<!doctype html><title>slow</title><p>{{ waited }} s, {{ items|length }} items</p>"


@app.get("/slow")
def slow():
    busy_until = time.thread_time() + float(request.args.get("cpu_ms", 0)) / 1000
    items = []
    while time.thread_time() < busy_until:
        items.append(sum(range(500)))
    time.sleep(float(request.args.get("s", 2)))
    return render_template_string(PAGE, waited=request.args.get("s", 2), items=items)
