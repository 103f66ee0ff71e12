"""igtcache.clients: how jobs reach the cache.

- ``igtcache.clients.fsspec_plugin``: the ``igtcache::`` fsspec filesystem for dataloaders.
- ``igtcache.clients.lora_kv``: ``LoraKVCache`` for inference servers (needs the ``torch`` extra).

Nothing is imported here, so that the fsspec plugin never pulls in torch.
"""
