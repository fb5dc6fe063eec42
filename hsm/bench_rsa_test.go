package hsm

import (
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha1"
	"testing"
	"time"

	"github.com/miekg/pkcs11"

	"blindperso/hsm/hsmtest"
	"blindperso/protocol"
)

// BenchmarkRSAUnwrap is each token's bare RSA cost, the floor of every
// RSA profile: C_UnwrapKey(RSA-OAEP SHA-1) of a card's c into a session
// AES key, then C_DestroyObject, in one session, with a session RSA-2048
// key (e = 65537 on every token: the private operation does not depend
// on e). Each token other than SoftHSM2 runs in alternating rounds with
// SoftHSM2, so that the machine's drift (DESIGN.md §9: ±30 % between
// runs) falls on both alike; the timer counts the token's rounds only.
// Reported: unwraps/s, SoftHSM2's unwraps/s in the same rounds, and
// vs-SoftHSM2, their ratio.
func BenchmarkRSAUnwrap(b *testing.B) {
	soft := newUnwrapBench(b, hsmtest.SoftHSM(b))
	b.Run("SoftHSM2", func(b *testing.B) {
		b.ResetTimer()
		d := soft.run(b, b.N)
		b.ReportMetric(float64(b.N)/d.Seconds(), "unwraps/s")
	})
	for _, tc := range []struct {
		name string
		open func(testing.TB) hsmtest.Token
	}{
		{"NSS", hsmtest.NSS},
		{"opencryptoki", hsmtest.OpenCryptoki},
	} {
		b.Run(tc.name, func(b *testing.B) {
			u := newUnwrapBench(b, tc.open(b))
			const rounds = 8
			var d, softD time.Duration
			softN := 0
			b.ResetTimer()
			b.StopTimer()
			for r := range rounds {
				n := b.N/rounds + boolInt(r < b.N%rounds)
				ns := max(n/2, 1)
				softD += soft.run(b, ns)
				softN += ns
				if n == 0 {
					continue
				}
				b.StartTimer()
				d += u.run(b, n)
				b.StopTimer()
			}
			rate, softRate := float64(b.N)/d.Seconds(), float64(softN)/softD.Seconds()
			b.ReportMetric(rate, "unwraps/s")
			b.ReportMetric(softRate, "SoftHSM2-unwraps/s")
			b.ReportMetric(rate/softRate, "vs-SoftHSM2")
		})
	}
}

// unwrapBench is a token with a session of its own holding an RSA key,
// and card ciphertexts under it.
type unwrapBench struct {
	s    Session
	priv pkcs11.ObjectHandle
	cs   [][]byte
	mech []*pkcs11.Mechanism
	tmpl []*pkcs11.Attribute
	next int
}

func newUnwrapBench(b *testing.B, ht hsmtest.Token) *unwrapBench {
	b.Helper()
	tok, err := OpenURI(ht.URI, 1)
	if err != nil {
		b.Fatal(err)
	}
	p, slot := tok.mod.ctx, tok.Info().Slot
	// Login state is per process: the pool logged this session in.
	h, err := p.OpenSession(slot, pkcs11.CKF_SERIAL_SESSION|pkcs11.CKF_RW_SESSION)
	if err != nil {
		tok.Close()
		b.Fatal(err)
	}
	b.Cleanup(func() {
		p.CloseSession(h) // and with it the session key
		tok.Close()
	})
	u := &unwrapBench{
		s: Session{P: p, H: h, M: tok.Mechanisms(), module: ht.Module},
		mech: []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_RSA_PKCS_OAEP,
			pkcs11.NewOAEPParams(pkcs11.CKM_SHA_1, pkcs11.CKG_MGF1_SHA1, pkcs11.CKZ_DATA_SPECIFIED, nil))},
		tmpl: secretTemplate(pkcs11.CKK_AES, 0, attr(pkcs11.CKA_DERIVE, true)),
	}
	pub, priv, err := ockRSAKey(u.s, 65537)
	if err != nil {
		b.Fatal(err)
	}
	u.priv = priv
	for range 64 {
		secret := make([]byte, protocol.OAEPSecretLen)
		rand.Read(secret)
		c, err := rsa.EncryptOAEP(sha1.New(), rand.Reader, pub, secret, nil)
		if err != nil {
			b.Fatal(err)
		}
		u.cs = append(u.cs, c)
	}
	return u
}

// run does n unwraps (each destroyed at once) and returns the time.
func (u *unwrapBench) run(b *testing.B, n int) time.Duration {
	start := time.Now()
	for range n {
		h, err := u.s.P.UnwrapKey(u.s.H, u.mech, u.priv, u.cs[u.next%len(u.cs)], u.tmpl)
		if err != nil {
			b.Fatal(Call("C_UnwrapKey", u.mech[0], err))
		}
		if err := u.s.P.DestroyObject(u.s.H, h); err != nil {
			b.Fatal(Call("C_DestroyObject", nil, err))
		}
		u.next++
	}
	return time.Since(start)
}
