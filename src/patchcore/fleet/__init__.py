"""Fleet scale on Ray: score many images on a cluster, fit many models at once.

Ray is optional (``pip install 'patchcore[ray]'``) and imported only here, and only when used.
"""
