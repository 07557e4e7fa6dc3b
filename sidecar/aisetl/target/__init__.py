"""The storage target: stores the objects HRW assigns to it and runs transformers."""
