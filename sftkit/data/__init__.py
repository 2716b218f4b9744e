"""Data: read and normalise rows (sources), render them to token ids and labels (render), batch (packing)."""
