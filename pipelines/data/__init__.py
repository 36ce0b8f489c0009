"""Data: reading scans from folders, manifests, .h5 and NIfTI (sources), decoding and the array cache (images),
duplicate-aware k-fold splits (splits), the embedded synthetic generator (synthetic) and what the prepare step hands
on (prepared)."""
