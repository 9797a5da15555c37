"""nginx in front of ``cifar5m serve ROOT --accel-redirect PREFIX``: nginx sends the bytes.

``SITE`` is the server block docs/serving.md shows (a test checks the two are the same);
``site_config`` fills in another root, prefix, address or upstream, and ``main_config`` wraps
it into a whole nginx.conf that runs in the foreground with its files in one folder (the
tests and ``benchmarks/serve_bench.py`` start nginx with it).

Every request goes to cifar5m serve, which applies the tokens, the revision and the
conditions (304, 412, 416) and answers a file GET with ``X-Accel-Redirect: PREFIX<the
file's path under ROOT>`` and the headers of the file. nginx then sends the file from its
``internal`` location: it copies Content-Type and Cache-Control from that answer itself,
sets Accept-Ranges, and ``add_header`` puts back the ETag (the sha256; nginx's own is turned
off) and X-Repo-Commit, which the clients need. Range and If-Range are applied by nginx
against that ETag; ``max_ranges 1`` answers a multi-range request with the whole file, as
cifar5m serve does.
"""

from __future__ import annotations

import os
from pathlib import Path

ROOT, PREFIX, LISTEN, UPSTREAM = "/srv/datasets/", "/_cifar5m_files/", "80", "127.0.0.1:8000"

SITE = """\
upstream cifar5m {
    server 127.0.0.1:8000;       # cifar5m serve /srv/datasets --accel-redirect /_cifar5m_files/
    keepalive 64;
}

server {
    listen 80;
    client_max_body_size 1m;     # paths-info bodies, the limit of cifar5m serve itself

    # The API, the pages and every file request: cifar5m serve checks tokens, revision and
    # conditions, and answers a file GET with X-Accel-Redirect for the location below.
    location / {
        proxy_pass http://cifar5m;
        proxy_http_version 1.1;
        proxy_set_header Connection "";
        proxy_set_header Host $http_host;
    }

    # The files, sent by nginx; internal: a request from outside gets 404.
    location /_cifar5m_files/ {
        internal;
        alias /srv/datasets/;    # ROOT, its real path (no symlink in it)
        disable_symlinks on;     # as cifar5m serve: no file swapped for a symlink is followed
        sendfile on;
        tcp_nopush on;
        max_ranges 1;            # several ranges: the whole file, as cifar5m serve answers
        etag off;                # the ETag is the file's sha256, from cifar5m serve
        if_modified_since off;   # conditional requests were answered by cifar5m serve
        add_header ETag $upstream_http_etag;
        add_header X-Repo-Commit $upstream_http_x_repo_commit;
    }
}
"""

_MAIN = """\
{user}worker_processes {workers};
daemon off;
pid {folder}/nginx.pid;
error_log {folder}/nginx-error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    keepalive_requests 1000000;
    client_body_temp_path {folder}/body;
    proxy_temp_path {folder}/proxy;
    fastcgi_temp_path {folder}/fastcgi;
    uwsgi_temp_path {folder}/uwsgi;
    scgi_temp_path {folder}/scgi;
    include {site};
}}
"""


def site_config(*, root: str | os.PathLike = ROOT, prefix: str = PREFIX, listen: str = LISTEN,
                upstream: str = UPSTREAM) -> str:
    """``SITE`` for files under ``root``, listening on ``listen``, cifar5m serve at ``upstream``."""
    root = str(root).rstrip("/") + "/"
    return (SITE.replace(f"alias {ROOT};", f"alias {root};").replace(PREFIX, prefix)
            .replace(f"listen {LISTEN};", f"listen {listen};").replace(f"server {UPSTREAM};", f"server {upstream};"))


def main_config(folder: str | os.PathLike, site: str, *, workers: int = 1) -> Path:
    """Write ``site`` and an nginx.conf that includes it (foreground, pid, logs and temp files
    in ``folder``) into ``folder``; the nginx.conf's path. Run as root, nginx's workers stay root
    so that they read what the caller can."""
    folder = Path(folder)
    (folder / "site.conf").write_text(site)
    user = "user root;\n" if os.geteuid() == 0 else ""
    conf = folder / "nginx.conf"
    conf.write_text(_MAIN.format(user=user, workers=workers, folder=folder, site=folder / "site.conf"))
    return conf
