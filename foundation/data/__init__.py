"""Data plumbing shared by every domain: an indexable sample stream, step-wise sampling, views, collation."""
