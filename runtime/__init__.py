"""Offline chat over llama.cpp for GGUFs made by qwen35 convert."""
