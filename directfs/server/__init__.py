"""The reference portal behind ``directfs serve``: a local directory published as a CTERA-compatible namespace.

Three surfaces (``docs/ctera-direct-io.md`` §14):

* WebDAV ``PROPFIND``/``GET`` under ``/ServicesPortal/webdav/`` (:mod:`.webdav`, :mod:`.app`);
* Direct IO ``GET /directio/{fileid}`` answering the v8.3+ JSON with signed block URLs (:mod:`.app`);
* the Notification Service ``POST /ServicesPortal/v2/api/metadata/{list,longpoll}`` (:mod:`.app`).

With ``--writable`` the WebDAV paths also take PUT, MKCOL, DELETE, MOVE and PROPPATCH (:mod:`.writes`, the write
handlers of :mod:`.app`, docs/serve-writes.md).

Files are cut into blocks (:mod:`.chunking`), encoded with :mod:`directfs.sources.ctera.codec`, stored once per content
in a block store (:mod:`.store`: a local directory served by the portal itself, or an S3 bucket), and remembered in a
sqlite index (:mod:`.index`) so a restart does not re-encode anything.

This package is a separate process: no client layer imports it (``cli`` imports ``commands.serve``, which imports
this package only inside ``run``).
"""
