package vpcd

import "syscall"

// setQuickAck re-arms TCP_QUICKACK: Linux clears it again after a while, so
// it is set before and after each frame-header read so that the driver's
// frames are acknowledged at once instead of after the delayed-ACK timeout,
// which together with Nagle on the driver side costs ~40 ms per APDU.
func setQuickAck(raw syscall.RawConn) {
	_ = raw.Control(func(fd uintptr) {
		_ = syscall.SetsockoptInt(int(fd), syscall.IPPROTO_TCP, syscall.TCP_QUICKACK, 1)
	})
}
