"""The block engine: the one read pipeline behind the mount, the Python API and the ``cp``/``stage``/``get``
commands. Block keys, the byte-bounded cache with single-flight fetches (:mod:`.cache`), read-ahead (:mod:`.prefetch`),
readers (:mod:`.reader`), ordered and unordered block streams (:mod:`.streams`) and the allocator tuning
(:mod:`.allocator`). Its concurrency rules: ``docs/engine-concurrency.md``."""
