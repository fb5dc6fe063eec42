package card

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"encoding/hex"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"blindperso/chipca"
	"blindperso/internal/iso7816"
	"blindperso/protocol"
)

// testCA is one chip-vendor CA for the whole package's tests: making one
// costs two key generations.
var testCA = func() *chipca.CA {
	ca, err := chipca.New("")
	if err != nil {
		panic(err)
	}
	return ca
}()

// attestation is a fresh attestation key and chain for the card id.
func attestation(t *testing.T, id []byte) *Attestation {
	t.Helper()
	c, err := testCA.NewCard(id, chipca.CertOptions{})
	if err != nil {
		t.Fatal(err)
	}
	at := Attestation(c)
	return &at
}

var attestedID = []byte{0xCA, 0xFE, 0, 2}

func newAttested(t *testing.T) *Applet {
	t.Helper()
	return newCard(t, Options{ID: attestedID, Attestation: attestation(t, attestedID)})
}

// p256Vector is a §8 vector with a P-256 issuer key: PERSONALIZE is fast.
func p256Vector(t *testing.T) protocol.Vector {
	t.Helper()
	v := vectors(t)[9]
	if v.Profile != protocol.ECDHP256AES.Name {
		t.Fatal("vector order changed")
	}
	return v
}

// toState brings a selected card to the life cycle want under vector v.
func toState(t *testing.T, a *Applet, want protocol.LifeCycle, v protocol.Vector) (c []byte) {
	t.Helper()
	if want == protocol.Blank {
		return nil
	}
	p, _ := protocol.ProfileByName(v.Profile)
	c, sw := personalize(t, a, p, v.IssuerSPKI)
	if sw != iso7816.SWOK {
		t.Fatalf("PERSONALIZE: %v", sw)
	}
	if want == protocol.Locked {
		if _, sw := exchange(t, a, cmd(protocol.INSLock, lockHash(c), 0)); sw != iso7816.SWOK {
			t.Fatalf("LOCK: %v", sw)
		}
	}
	return c
}

func statusOf(t *testing.T, a *Applet) protocol.Status {
	t.Helper()
	b, sw := exchange(t, a, cmd(protocol.INSGetStatus, nil, 256))
	if sw != iso7816.SWOK {
		t.Fatalf("GET STATUS: %v", sw)
	}
	s, err := protocol.ParseStatus(b)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// §10.3 for every life cycle, attested or not: the two commands' status
// words, their parameter checks, and the GET STATUS flag.
func TestAttestationCommandsByState(t *testing.T) {
	v := p256Vector(t)
	ok, notMet, none := iso7816.SWOK, iso7816.SWConditionsNotMet, iso7816.SWDataNotFound
	for _, tc := range []struct {
		attested           bool
		state              protocol.LifeCycle
		chain, attestation iso7816.SW
	}{
		{true, protocol.Blank, ok, notMet},
		{true, protocol.Personalized, ok, ok},
		{true, protocol.Locked, ok, notMet},
		{false, protocol.Blank, none, none},
		{false, protocol.Personalized, none, none},
		{false, protocol.Locked, none, none},
	} {
		name := tc.state.String()
		if !tc.attested {
			name = "unattested " + name
		}
		t.Run(name, func(t *testing.T) {
			o := Options{ID: attestedID}
			if tc.attested {
				o.Attestation = attestation(t, attestedID)
			}
			a := newCard(t, o)
			selectApplet(t, a)
			toState(t, a, tc.state, v)
			if s := statusOf(t, a); s.Attested != tc.attested || s.State != tc.state {
				t.Fatalf("GET STATUS %+v", s)
			}
			raw, _ := send(t, a, apdu("80 12 00 00 00"))
			if got := raw[3]&protocol.StatusFlagAttested != 0; got != tc.attested {
				t.Fatalf("GET STATUS flags %02X", raw[3])
			}
			if a.Attested() != tc.attested {
				t.Fatal("Attested() disagrees with the options")
			}
			// The chain is over 256 bytes: Le = 00 gets 256 of them and 6100.
			rawChain := tc.chain
			if rawChain == ok {
				rawChain = iso7816.SWBytesRemaining
			}
			for _, c := range []struct {
				name string
				apdu string
				want iso7816.SW
			}{
				{"GET ATTESTATION CHAIN", "80 14 00 00 00", rawChain},
				{"READ ATTESTATION", "80 26 00 00 00", tc.attestation},
				// §6.8 order: parameters and length before the card's
				// own data and state, as for READ CIPHERTEXT.
				{"GET ATTESTATION CHAIN P1", "80 14 01 00 00", iso7816.SWWrongP1P2},
				{"GET ATTESTATION CHAIN P2", "80 14 00 01 00", iso7816.SWWrongP1P2},
				{"GET ATTESTATION CHAIN data", "80 14 00 00 01 00 00", iso7816.SWWrongLength},
				{"READ ATTESTATION P1", "80 26 01 00 00", iso7816.SWWrongP1P2},
				{"READ ATTESTATION P2", "80 26 00 80 00", iso7816.SWWrongP1P2},
				{"READ ATTESTATION data", "80 26 00 00 02 0000", iso7816.SWWrongLength},
				{"GET ATTESTATION CHAIN in ISO class", "00 14 00 00 00", iso7816.SWCLANotSupported},
				{"READ ATTESTATION chained", "90 26 00 00 00", iso7816.SWChainingUnsupported},
			} {
				if _, sw := send(t, a, apdu(c.apdu)); sw != c.want {
					t.Errorf("%s (%s): %v, want %v", c.name, c.apdu, sw, c.want)
				}
			}
			// Through a Client, the whole answers.
			chain, sw := exchange(t, a, cmd(protocol.INSGetAttestationChain, nil, 256))
			if sw != tc.chain {
				t.Fatalf("GET ATTESTATION CHAIN via GET RESPONSE: %v, want %v", sw, tc.chain)
			}
			if tc.attested && !bytes.Equal(chain, bytes.Join(o.Attestation.Chain, nil)) {
				t.Fatal("GET ATTESTATION CHAIN is not the manufactured chain")
			}
		})
	}

	// Selection comes before everything of the command's own.
	a := newCard(t, Options{ID: attestedID})
	for _, c := range []string{"80 14 00 00 00", "80 26 00 00 00", "80 14 01 00 00"} {
		if _, sw := send(t, a, apdu(c)); sw != iso7816.SWCommandNotAllowed {
			t.Errorf("unselected %s: %v, want 6986", c, sw)
		}
	}
}

// The chain is over 256 bytes, so it comes in 61XX pieces; any other
// command drops what is still waiting, and a chain in progress is broken
// by these commands like by any other.
func TestAttestationChainGetResponse(t *testing.T) {
	at := attestation(t, attestedID)
	want := bytes.Join(at.Chain, nil)
	if len(want) <= 256+255 {
		t.Fatalf("chain of %d bytes does not exercise 6100", len(want))
	}
	a := newCard(t, Options{ID: attestedID, Attestation: at})
	selectApplet(t, a)

	got, sw := send(t, a, apdu("80 14 00 00 00"))
	if len(got) != 256 || sw != iso7816.SWBytesRemaining {
		t.Fatalf("Le=00: %d bytes, %v; want 256 and 6100", len(got), sw)
	}
	for sw != iso7816.SWOK {
		n, more := sw.Remaining()
		if !more {
			t.Fatalf("GET RESPONSE chain ended with %v", sw)
		}
		next, sw2 := send(t, a, iso7816Bytes(t, iso7816.Command{CLA: 0, INS: protocol.INSGetResponse, Ne: n}))
		if sw2 == iso7816.SWOK && len(next) != len(want)-len(got) {
			t.Fatalf("last piece of %d bytes", len(next))
		}
		got, sw = append(got, next...), sw2
	}
	if !bytes.Equal(got, want) {
		t.Fatal("reassembled chain differs from the manufactured one")
	}
	certs, err := protocol.SplitChain(got)
	if err != nil || len(certs) != 2 {
		t.Fatalf("SplitChain: %d certificates, %v", len(certs), err)
	}

	// Without Le everything waits; the exact count when under 256.
	if data, sw := send(t, a, apdu("80 14 00 00")); len(data) != 0 || sw != iso7816.SWBytesRemaining {
		t.Fatalf("no Le: %d bytes, %v", len(data), sw)
	}
	if _, sw := send(t, a, apdu("80 10 00 00 00")); sw != iso7816.SWOK {
		t.Fatalf("GET ID: %v", sw)
	}
	if _, sw := send(t, a, apdu("00 C0 00 00 00")); sw != iso7816.SWConditionsNotMet {
		t.Fatalf("GET RESPONSE after another command: %v, want 6985", sw)
	}
	// Pieces of 256 announce 6100 while 256 or more wait, then the exact
	// count of what is left.
	_, sw = send(t, a, apdu("80 14 00 00 00"))
	for sent := 256; ; sent += 256 {
		left, wantSW := len(want)-sent, iso7816.SWBytesRemaining
		if left < 256 {
			wantSW |= iso7816.SW(left)
			if left == 0 {
				wantSW = iso7816.SWOK
			}
		}
		if sw != wantSW {
			t.Fatalf("after %d bytes: %v, want %v", sent, sw, wantSW)
		}
		if left < 256 {
			break
		}
		_, sw = send(t, a, apdu("00 C0 00 00 00"))
	}

	// Mid-chain: 6883, and the chain is gone.
	v := p256Vector(t)
	first := iso7816.Chain(cmd(protocol.INSPersonalize, append(bytes.Clone(v.IssuerSPKI), make([]byte, 200)...), 256), protocol.CLAChaining)[0]
	first.P1 = protocol.ECDHP256AES.ID
	if _, sw := send(t, a, iso7816Bytes(t, first)); sw != iso7816.SWOK {
		t.Fatalf("first link: %v", sw)
	}
	if _, sw := send(t, a, apdu("80 14 00 00 00")); sw != iso7816.SWLastCommandExpected {
		t.Fatalf("GET ATTESTATION CHAIN mid-chain: %v, want 6883", sw)
	}
}

func iso7816Bytes(t *testing.T, c iso7816.Command) []byte {
	t.Helper()
	b, err := c.Bytes()
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// The signature an attested card answers is over §10.2's A, under the
// key its certificate certifies, and the chain verifies to the vendor's
// root: what the issuer will check.
func TestAttestationSignatureVerifies(t *testing.T) {
	for _, v := range vectors(t) {
		t.Run(v.Name, func(t *testing.T) {
			at := attestation(t, v.CardID)
			a := newCard(t, Options{ID: v.CardID, Attestation: at})
			a.SetRand(bytes.NewReader(v.CardRand))
			cl := &Client{T: a.Local()}
			if err := cl.Select(); err != nil {
				t.Fatal(err)
			}
			p, _ := protocol.ProfileByName(v.Profile)
			c, err := cl.Personalize(p, v.IssuerSPKI)
			if err != nil || !bytes.Equal(c, v.C) {
				t.Fatalf("PERSONALIZE = %x, %v; want the vector's c (the signature must not draw from card_rand)", c, err)
			}
			sig, err := cl.ReadAttestation()
			if err != nil {
				t.Fatal(err)
			}
			if len(sig) < 8 || len(sig) > 72 {
				t.Fatalf("signature of %d bytes", len(sig))
			}
			chain, err := cl.AttestationChain()
			if err != nil {
				t.Fatal(err)
			}
			cert := verifyChain(t, chain)
			h := sha256.Sum256(c)
			msg, err := protocol.AttestMessage(v.CardID, p.Name, v.Fingerprint, h[:])
			if err != nil {
				t.Fatal(err)
			}
			d := sha256.Sum256(msg)
			if !ecdsa.VerifyASN1(cert.PublicKey.(*ecdsa.PublicKey), d[:], sig) {
				t.Fatal("card's signature does not verify over A")
			}
			// Not over anything else: another c, another key, another Id.
			for _, bad := range [][]byte{
				mustAttest(t, v.CardID, p.Name, v.Fingerprint, make([]byte, 32)),
				mustAttest(t, v.CardID, p.Name, make([]byte, 32), h[:]),
				mustAttest(t, []byte{1}, p.Name, v.Fingerprint, h[:]),
			} {
				d := sha256.Sum256(bad)
				if ecdsa.VerifyASN1(cert.PublicKey.(*ecdsa.PublicKey), d[:], sig) {
					t.Fatal("signature verifies over a different statement")
				}
			}
		})
	}
}

func mustAttest(t *testing.T, id []byte, profile string, fp, ch []byte) []byte {
	t.Helper()
	m, err := protocol.AttestMessage(id, profile, fp, ch)
	if err != nil {
		t.Fatal(err)
	}
	return m
}

// verifyChain checks a chain against testCA's root and returns the card
// certificate.
func verifyChain(t *testing.T, chain [][]byte) *x509.Certificate {
	t.Helper()
	cert, err := x509.ParseCertificate(chain[0])
	if err != nil {
		t.Fatal(err)
	}
	inter := x509.NewCertPool()
	for _, d := range chain[1:] {
		c, err := x509.ParseCertificate(d)
		if err != nil {
			t.Fatal(err)
		}
		inter.AddCert(c)
	}
	if _, err := cert.Verify(x509.VerifyOptions{Roots: testCA.Roots(), Intermediates: inter, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}}); err != nil {
		t.Fatalf("chain does not verify: %v", err)
	}
	return cert
}

// A station that crashes between PERSONALIZE and LOCK recovers c and sig
// from the reopened card, the same bytes; LOCK erases sig with c, from
// the state file too, and the chain stays.
func TestAttestationSurvivesCrash(t *testing.T) {
	v := p256Vector(t)
	a := newAttested(t)
	selectApplet(t, a)
	c := toState(t, a, protocol.Personalized, v)
	sig, sw := exchange(t, a, cmd(protocol.INSReadAttestation, nil, 256))
	if sw != iso7816.SWOK {
		t.Fatalf("READ ATTESTATION: %v", sw)
	}
	if again, _ := exchange(t, a, cmd(protocol.INSReadAttestation, nil, 256)); !bytes.Equal(again, sig) {
		t.Fatal("second READ ATTESTATION differs")
	}
	chain, _ := exchange(t, a, cmd(protocol.INSGetAttestationChain, nil, 256))

	// The "crash": the process is gone; only the state file is left.
	b, err := Open(a.Path())
	if err != nil {
		t.Fatal(err)
	}
	if !b.Attested() || b.LifeCycle() != protocol.Personalized {
		t.Fatal("reopened card lost its attestation or state")
	}
	selectApplet(t, b)
	if got, sw := exchange(t, b, cmd(protocol.INSReadAttestation, nil, 256)); sw != iso7816.SWOK || !bytes.Equal(got, sig) {
		t.Fatalf("READ ATTESTATION after reopen = %x %v, want %x", got, sw, sig)
	}
	if got, _ := exchange(t, b, cmd(protocol.INSReadCiphertext, nil, 256)); !bytes.Equal(got, c) {
		t.Fatal("READ CIPHERTEXT after reopen differs")
	}
	if got, _ := exchange(t, b, cmd(protocol.INSGetAttestationChain, nil, 256)); !bytes.Equal(got, chain) {
		t.Fatal("chain after reopen differs")
	}
	raw, _ := os.ReadFile(b.Path())
	if !bytes.Contains(raw, []byte(hex.EncodeToString(sig))) {
		t.Fatal("state file does not hold sig")
	}

	if _, sw := exchange(t, b, cmd(protocol.INSLock, lockHash(c), 0)); sw != iso7816.SWOK {
		t.Fatalf("LOCK: %v", sw)
	}
	raw, _ = os.ReadFile(b.Path())
	if bytes.Contains(raw, []byte(hex.EncodeToString(sig))) || bytes.Contains(raw, []byte(hex.EncodeToString(c))) {
		t.Fatal("state file still holds sig or c after LOCK")
	}
	l, err := Open(b.Path())
	if err != nil {
		t.Fatal(err)
	}
	selectApplet(t, l)
	if _, sw := exchange(t, l, cmd(protocol.INSReadAttestation, nil, 256)); sw != iso7816.SWConditionsNotMet {
		t.Fatalf("READ ATTESTATION after LOCK: %v, want 6985", sw)
	}
	if got, sw := exchange(t, l, cmd(protocol.INSGetAttestationChain, nil, 256)); sw != iso7816.SWOK || !bytes.Equal(got, chain) {
		t.Fatalf("chain after LOCK: %v", sw)
	}
	if s := statusOf(t, l); !s.Attested {
		t.Fatal("locked card lost the attested flag")
	}
}

// A failed state write leaves an attested card blank, with no signature
// behind: sig and c are one write.
func TestAttestationPersistFailure(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "sub")
	if err := os.Mkdir(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	a, err := Manufacture(filepath.Join(dir, "card.json"), Options{ID: attestedID, Attestation: attestation(t, attestedID)})
	if err != nil {
		t.Fatal(err)
	}
	selectApplet(t, a)
	if err := os.RemoveAll(dir); err != nil {
		t.Fatal(err)
	}
	v := p256Vector(t)
	if _, sw := personalize(t, a, protocol.ECDHP256AES, v.IssuerSPKI); sw != iso7816.SWMemoryFailure {
		t.Fatalf("PERSONALIZE with no storage: %v, want 6581", sw)
	}
	if a.LifeCycle() != protocol.Blank || len(a.st.AttestSig) != 0 {
		t.Fatal("card changed although its state was not written")
	}
	if _, sw := exchange(t, a, cmd(protocol.INSReadAttestation, nil, 256)); sw != iso7816.SWConditionsNotMet {
		t.Fatalf("READ ATTESTATION: %v, want 6985", sw)
	}
}

// State files written before the extension load as unattested cards.
func TestOldStateFiles(t *testing.T) {
	for name, content := range map[string]string{
		"blank":        `{"format":"blindperso-vcard/1","id":"01","life_cycle":"blank"}`,
		"personalized": `{"format":"blindperso-vcard/1","id":"01","life_cycle":"personalized","profile_id":5,"issuer_fingerprint":"` + strings.Repeat("ab", 32) + `","k_i":"` + strings.Repeat("11", 16) + `","c":"04"}`,
		"locked":       `{"format":"blindperso-vcard/1","id":"01","life_cycle":"locked","profile_id":5,"issuer_fingerprint":"` + strings.Repeat("ab", 32) + `","k_i":"` + strings.Repeat("11", 16) + `"}`,
	} {
		t.Run(name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "card.json")
			if err := os.WriteFile(path, []byte(content), 0o600); err != nil {
				t.Fatal(err)
			}
			a, err := Open(path)
			if err != nil {
				t.Fatal(err)
			}
			selectApplet(t, a)
			if a.Attested() || statusOf(t, a).Attested {
				t.Fatal("old card reads as attested")
			}
			for _, c := range []string{"80 14 00 00 00", "80 26 00 00 00"} {
				if _, sw := send(t, a, apdu(c)); sw != iso7816.SWDataNotFound {
					t.Errorf("%s: %v, want 6A88", c, sw)
				}
			}
		})
	}
}

// Manufacture and Open refuse an attestation that could never verify,
// and state files whose signature is where it cannot be.
func TestAttestationValidation(t *testing.T) {
	good := attestation(t, attestedID)
	other := attestation(t, attestedID)
	p384, _ := ecdsa.GenerateKey(elliptic.P384(), rand.Reader)
	for name, at := range map[string]*Attestation{
		"no key":                      {Chain: good.Chain},
		"no chain":                    {Key: good.Key},
		"key the chain does not hold": {Key: other.Key, Chain: good.Chain},
		"P-384 key":                   {Key: p384, Chain: good.Chain},
		"chain entry not DER":         {Key: good.Key, Chain: [][]byte{good.Chain[0], {0x30, 0x01}}},
		"two certificates in one":     {Key: good.Key, Chain: [][]byte{bytes.Join(good.Chain, nil)}},
		"chain over the bound":        {Key: good.Key, Chain: [][]byte{good.Chain[0], make([]byte, protocol.MaxAttestationChain)}},
	} {
		if _, err := Manufacture(filepath.Join(t.TempDir(), "c.json"), Options{ID: attestedID, Attestation: at}); err == nil {
			t.Errorf("Manufacture with %s accepted", name)
		}
	}

	// A personalized attested card must have its signature; blank and
	// locked ones must not.
	v := p256Vector(t)
	a := newAttested(t)
	selectApplet(t, a)
	toState(t, a, protocol.Personalized, v)
	raw, _ := os.ReadFile(a.Path())
	sig := hex.EncodeToString(a.st.AttestSig)
	for name, edit := range map[string]string{
		"personalized without sig": strings.Replace(string(raw), `"attestation_sig": "`+sig+`"`, `"attestation_sig": ""`, 1),
		"locked with sig":          strings.Replace(strings.Replace(string(raw), `"personalized"`, `"locked"`, 1), `"c": "`+hex.EncodeToString(a.st.C)+`"`, `"c": ""`, 1),
		"chain without key":        strings.Replace(string(raw), `"attestation_key": "`+hex.EncodeToString(a.st.AttestKey)+`"`, `"attestation_key": ""`, 1),
	} {
		if edit == string(raw) {
			t.Fatalf("%s: edit did not apply", name)
		}
		path := filepath.Join(t.TempDir(), "card.json")
		if err := os.WriteFile(path, []byte(edit), 0o600); err != nil {
			t.Fatal(err)
		}
		if _, err := Open(path); err == nil {
			t.Errorf("Open of a card state with %s accepted", name)
		}
	}
}
