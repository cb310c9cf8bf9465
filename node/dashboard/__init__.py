"""The dashboard's files (index.html, app.js, style.css): package data the daemon serves at
``/`` and ``/dashboard/...`` (`fusenode.node.api`). Plain HTML, CSS and JavaScript, no build
step; no Python here."""
