"""Test support: real servers (SeaweedFS S3) and independent format implementations."""
