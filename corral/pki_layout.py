"""Where a PKI directory and an identity directory keep their files.

One list for everything that reads or writes them: `corral certs`
(corral.pki) writes them, corrald and the client (corral.tls) read them,
and neither of the readers needs the PKI code to know where to look.
"""

CA_CERT_FILE = "ca.crt"
CA_KEY_FILE = "ca.key"
SERVER_CERT_FILE = "server.crt"
SERVER_KEY_FILE = "server.key"
# Under it, a directory per client (an identity directory): the CA's
# certificate and the client's own.
CLIENTS_DIR = "clients"
CLIENT_CERT_FILE = "client.crt"
CLIENT_KEY_FILE = "client.key"

__all__ = [
    "CA_CERT_FILE",
    "CA_KEY_FILE",
    "CLIENTS_DIR",
    "CLIENT_CERT_FILE",
    "CLIENT_KEY_FILE",
    "SERVER_CERT_FILE",
    "SERVER_KEY_FILE",
]
