"""Several engine replicas on a Ray cluster behind one OpenAI-compatible endpoint, with requests
routed to the replica whose prefix cache holds their prompt (needs `pip install
'nanoserve[ray]'`): the router (router.py), a replica (replica.py), the ingress (ingress.py),
merged metrics (metrics.py), the Ray Serve application (app.py) and its command (cli.py)."""
