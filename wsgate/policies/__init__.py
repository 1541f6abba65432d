"""The built-in policies; importing this package registers every one of them.

* :mod:`.basic`: request shaping and access (check-header, ip-filter, set-header,
  rewrite-uri, return-response, ...);
* :mod:`.jwt`: validate-jwt;
* :mod:`.limits`: rate limits, quotas, concurrency and message-rate limits.

Around them: :mod:`.registry` (name -> class, ``@register``),
:mod:`.subscription` (:func:`~.subscription.check_subscription`) and
:mod:`.pipeline` (:func:`~.pipeline.pipeline`). Those two read the config, so
this package does not import them: :mod:`wsgate.config` imports the registry
(and so this package) to read ``policies`` tables.
"""

from __future__ import annotations

from . import basic, jwt, limits, registry

__all__ = ["basic", "jwt", "limits", "registry"]
