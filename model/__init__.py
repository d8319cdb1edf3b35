"""model package: pure PyTorch networks, patches, losses, metrics and checkpoint I/O."""

from model.allocator import keep_freed_memory

keep_freed_memory()
