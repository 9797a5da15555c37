"""Serve cifar5m datasets as Hugging Face Hub dataset repositories (``cifar5m serve``).

``app`` (routing, limits, access log) -> ``api`` (info, tree, paths-info) and
``resolve`` (file bytes, ranges) over ``repo`` (files, hashes, commit sha) with
``auth`` (tokens), and ``viewer`` (the HTML pages); ``server`` runs it in the aiohttp worker
processes of ``workers``; ``download`` is the client side
(``cifar5m download``). Imports no torch.
"""
