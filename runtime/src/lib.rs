//! Shared runtime: node loop, HTTP front end, tunnel server (generic over the transport).
