"""How minigpt uses the CPU: its own threads (parallel) and memory kept between steps (allocator)."""
