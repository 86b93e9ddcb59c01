"""Conversations and their rendering into token ids and loss labels (harmony for gpt-oss, a generic path otherwise)."""
