"""Commands of the dataset server: serve (the Hub API over local datasets) and download."""

from __future__ import annotations

import click

from cifar5m.cli.options import config_option, parse_storage_options
from cifar5m.dataset_server.config import ServeConfig


@click.command("serve")
@click.argument("root")
@config_option(ServeConfig, "host", help="Address to listen on (0.0.0.0: every interface).")
@config_option(ServeConfig, "port", type=click.IntRange(0, 65535))
@config_option(ServeConfig, "tokens", type=click.Path(exists=True, dir_okay=False),
               help="YAML/JSON file of bearer tokens per private or gated dataset (see docs/serving.md).")
@config_option(ServeConfig, "workers", type=click.IntRange(min=1),
               help="Server processes, about one per free core.")
@config_option(ServeConfig, "page_size", type=click.IntRange(min=1),
               help="Entries per page of tree listings (the Hub's is 1000).")
@config_option(ServeConfig, "access_log", "--access-log/--no-access-log", show_default=True,
               help="Log one line per request to stderr.")
@config_option(ServeConfig, "storage_options", callback=lambda _ctx, _param, value: parse_storage_options(value),
               help='fsspec options of an s3:// (gs://, ...) ROOT as JSON, e.g. '
                    '\'{"client_kwargs": {"endpoint_url": "http://minio:9000"}}\'.')
@config_option(ServeConfig, "url_expiry_s", type=click.IntRange(min=1),
               help="Seconds a signed URL of a file of an s3:// ROOT stays valid.")
@config_option(ServeConfig, "accel_redirect", metavar="PREFIX",
               help="Answer file GETs with X-Accel-Redirect: PREFIX<path under ROOT> for nginx to "
                    "send (its internal location aliasing ROOT; docs/serving.md).")
def serve_cmd(root: str, **fields) -> None:
    """Serve every dataset ROOT/<org>/<name>/ as a Hugging Face Hub dataset repo.

    ROOT is a folder or an object-store URL (s3://bucket/prefix, any fsspec URL; credentials
    and AWS_ENDPOINT_URL as for the AWS tools, or --storage-options): the API and pages are
    answered from the manifests read there, files by a redirect to a signed URL.

    A dataset folder right under ROOT (ROOT/<name>/manifest.json, as `make demo` writes)
    is served as local/<name>, and ROOT may itself be one dataset folder (it has
    manifest.json): it is served as local/<folder name>. huggingface_hub, datasets and webdataset URLs download from it
    as from the Hub; a browser at http://HOST:PORT/ shows each dataset's page. Stop with
    Ctrl-C (running downloads get 10 s to finish).

    \b
    Example:
      cifar5m serve data --port 8000
      cifar5m serve data/lab/cifar10 --port 8000     # one dataset, as local/cifar10
      cifar5m serve demo-output                      # local/cifar10, local/generated
      cifar5m serve s3://bucket/datasets             # s3://bucket/datasets/<org>/<name>/
      cifar5m serve data --accel-redirect /_cifar5m_files/   # behind nginx (docs/serving.md)
      HF_ENDPOINT=http://127.0.0.1:8000 python -c \\
        "import datasets; print(next(iter(datasets.load_dataset('lab/cifar10', split='train', streaming=True))))"
      cifar5m download lab/cifar10 --endpoint http://127.0.0.1:8000 --local-dir cifar10
    """
    from cifar5m.dataset_server.server import run

    run(ServeConfig(root=root, **fields))


@click.command("download")
@click.argument("repo")
@click.option("--endpoint", help="Server URL, e.g. http://127.0.0.1:8000 (default: HF_ENDPOINT or the Hub).")
@click.option("--revision", help="Branch or commit sha (default: main).")
@click.option("--local-dir", type=click.Path(file_okay=False),
              help="Folder to download into (default: the huggingface_hub cache).")
@click.option("--token", help="Bearer token of a private or gated dataset (default: HF_TOKEN).")
@click.option("--workers", type=click.IntRange(min=1), default=8, show_default=True,
              help="Files downloaded in parallel.")
def download_cmd(repo: str, endpoint: str | None, revision: str | None, local_dir: str | None,
                 token: str | None, workers: int) -> None:
    """Download dataset REPO (org/name) and check every file against its manifest.

    Re-running after an interruption fetches only the files not yet complete.

    \b
    Example:
      cifar5m download lab/cifar10 --endpoint http://127.0.0.1:8000 --local-dir data/cifar10
      cifar5m verify data/cifar10
    """
    from cifar5m.dataset_server.download import download

    result = download(repo, endpoint=endpoint, revision=revision, local_dir=local_dir, token=token,
                      max_workers=workers)
    click.echo(f"{repo}: {result.files} files, {result.bytes / 1e6:,.1f} MB verified in {result.path}")
