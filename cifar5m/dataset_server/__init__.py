"""Serve cifar5m datasets as Hugging Face Hub dataset repositories (``cifar5m serve``).

``app`` (routing, limits, access log) -> ``api`` (info, tree, paths-info) and
``resolve`` (file bytes, ranges; redirects to signed URLs of a store, X-Accel-Redirect for
``nginx``) over ``repo`` (a folder's files and commit sha) or ``store`` (the same on an
object store), with ``hashes`` (sha256s read once) and ``auth`` (tokens), and ``viewer``
(the HTML pages); ``server`` runs it in the aiohttp worker processes of ``workers``;
``download`` is the client side (``cifar5m download``). Imports no torch.
"""
