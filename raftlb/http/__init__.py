"""HTTP/1.1 on asyncio.Protocol + httptools: the downstream server and the app layer."""
