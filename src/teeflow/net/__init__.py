"""Network clients and listeners shared by the roles: the only place that opens sockets
outside the servers themselves. Pure protocol pieces stay in `teeflow.core`."""
