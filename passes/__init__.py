"""The pass pipeline over the multi-tenant graph; the order is in pipeline.py."""
