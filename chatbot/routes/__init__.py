"""Thin adapters from HTTP and WebSocket to the conversation logic in `chatbot.chat`."""
