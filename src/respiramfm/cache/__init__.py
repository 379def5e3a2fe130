"""One content-addressed vector cache for audio embeddings and text targets, with one lock style.

``shards`` holds the cache itself, ``view`` the per-manifest array that
``respiramfm embed`` writes, ``tables`` the report tables and ``lock`` the file
lock every writer takes.
"""

from respiramfm.cache.lock import exclusive
from respiramfm.cache.shards import VectorCache, content_key, group_id, remove_stale_tmp

__all__ = ["VectorCache", "content_key", "exclusive", "group_id", "remove_stale_tmp"]
