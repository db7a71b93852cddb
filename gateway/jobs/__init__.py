"""Async jobs: OpenAI's Files and Batch APIs and single-request jobs (202 + poll) on a durable queue.

See docs/jobs.md.
"""
