# /etc/profile.d/igtcache.sh: where jobs on this machine find the daemon, and that they may
# trust it although it runs as the igtcache user (clients trust only themselves and root).
export IGTCACHE_SOCKET=/run/igtcache/igtcache.sock
export IGTCACHE_DAEMON_UID=igtcache
