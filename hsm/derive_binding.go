package hsm

import (
	"sync"

	"blindperso/protocol"
)

// issuerBinding is what a chain needs from the issuer key, computed once
// per (profile, key): the parsed key (to check c's shape), B and the aes
// KDF's input block.
type issuerBinding struct {
	key   *protocol.IssuerKey
	b     []byte
	block []byte
}

// bindings caches issuerBinding by profile and SPKI: an issuer has a few
// keys, and parsing one per import shows (docs/BENCHMARKS.md, "Where the
// time went"). Bounded, so arbitrary SPKIs cannot grow it without limit.
var bindings = struct {
	sync.Mutex
	m map[string]*issuerBinding
}{m: map[string]*issuerBinding{}}

const maxBindings = 64

func bindingFor(p protocol.Profile, spki []byte) (*issuerBinding, error) {
	id := p.Name + "\x00" + string(spki)
	bindings.Lock()
	ib := bindings.m[id]
	bindings.Unlock()
	if ib != nil {
		return ib, nil
	}
	key, err := protocol.ParseIssuerKey(spki)
	if err != nil {
		return nil, err
	}
	if err := key.Fits(p); err != nil {
		return nil, err
	}
	b := protocol.Binding(p, key.SPKI)
	ib = &issuerBinding{key: key, b: b, block: protocol.AESKDFInput(b)}
	bindings.Lock()
	if len(bindings.m) < maxBindings {
		bindings.m[id] = ib
	}
	bindings.Unlock()
	return ib, nil
}
