"""The packed-domain layout (docs/data.md): the names every stage reads and writes under
`<shards>/<domain>/`, and the image extensions the readers accept.

    <shards>/<domain>/catalog.parquet       one row per item (row = the item's index everywhere)
                      interactions.parquet  user, item row, timestamp: the sequences
                      items-000000.tar ...  WebDataset shards: one sample per item (shards.py)
                      pack_report.json      what was read, kept and skipped, and why
"""

CATALOG = "catalog.parquet"
INTERACTIONS = "interactions.parquet"
PACK_REPORT = "pack_report.json"
SHARD_PATTERN = "items-{:06d}.tar"
SHARD_GLOB = "items-*.tar"
# raw image files named <item_id>.<ext>, and image keys in a shard sample (`1.jpg`-style too)
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
# PIL format -> the extension a shard stores it under (only these are ever decoded)
IMAGE_FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}
