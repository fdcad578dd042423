"""Stage 1, dataset: official download layouts → a `RecordsTable`, images → a uint8 cache."""
