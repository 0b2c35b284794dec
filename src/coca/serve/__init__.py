"""`coca serve` (HTTP API with dynamic batching and a web page) and `coca index` (image search index)."""
