"""igtcache.fuse: the POSIX view of a remote through the cache (`igtcache mount`), on mfusepy and libfuse 3."""
