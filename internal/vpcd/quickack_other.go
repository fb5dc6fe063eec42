//go:build !linux

package vpcd

import "syscall"

// setQuickAck is a no-op where TCP_QUICKACK does not exist.
func setQuickAck(syscall.RawConn) {}
