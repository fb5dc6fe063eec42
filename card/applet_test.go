package card

import (
	"bytes"
	"crypto"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/x509"
	"encoding/hex"
	"encoding/pem"
	"errors"
	"math/big"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"blindperso/internal/iso7816"
	"blindperso/protocol"
)

const vectorsFile = "../testdata/vectors.json"

func newCard(t *testing.T, o Options) *Applet {
	t.Helper()
	if o.ID == nil {
		o.ID = []byte{0xCA, 0xFE, 0, 1}
	}
	a, err := Manufacture(filepath.Join(t.TempDir(), "card.json"), o)
	if err != nil {
		t.Fatal(err)
	}
	return a
}

func apdu(s string) []byte {
	b, err := hex.DecodeString(strings.ReplaceAll(s, " ", ""))
	if err != nil {
		panic(err)
	}
	return b
}

// send transmits one APDU and returns data and status word.
func send(t *testing.T, a *Applet, c []byte) ([]byte, iso7816.SW) {
	t.Helper()
	r, err := iso7816.ParseResponse(a.Transmit(c))
	if err != nil {
		t.Fatal(err)
	}
	return r.Data, r.SW
}

// exchange sends a command through a Client (chaining, GET RESPONSE) and
// returns the data and the final status word.
func exchange(t *testing.T, a *Applet, cmd iso7816.Command) ([]byte, iso7816.SW) {
	t.Helper()
	data, err := (&Client{T: a.Local()}).Exchange(cmd)
	var sw iso7816.SW
	if errors.As(err, &sw) {
		return nil, sw
	}
	if err != nil {
		t.Fatal(err)
	}
	return data, iso7816.SWOK
}

func selectApplet(t *testing.T, a *Applet) {
	t.Helper()
	if _, sw := exchange(t, a, iso7816.Command{CLA: 0, INS: protocol.INSSelect, P1: 4, Data: protocol.AID, Ne: 256}); sw != iso7816.SWOK {
		t.Fatalf("SELECT: %v", sw)
	}
}

func personalize(t *testing.T, a *Applet, p protocol.Profile, spki []byte) ([]byte, iso7816.SW) {
	t.Helper()
	return exchange(t, a, iso7816.Command{CLA: protocol.CLAProprietary, INS: protocol.INSPersonalize, P1: p.ID, Data: spki, Ne: 256})
}

func cmd(ins byte, data []byte, ne int) iso7816.Command {
	return iso7816.Command{CLA: protocol.CLAProprietary, INS: ins, Data: data, Ne: ne}
}

func lockHash(c []byte) []byte { h := sha256.Sum256(c); return h[:] }

func vectors(t *testing.T) []protocol.Vector {
	t.Helper()
	vs, err := protocol.ReadVectors(vectorsFile)
	if err != nil {
		t.Fatal(err)
	}
	return vs
}

// Every vector through the card's APDU interface: fed card_rand, the card
// answers c, and after LOCK its MAC of the challenge is the vector's.
func TestCardPassesVectors(t *testing.T) {
	for _, v := range vectors(t) {
		t.Run(v.Name, func(t *testing.T) {
			a := newCard(t, Options{ID: v.CardID})
			a.SetRand(bytes.NewReader(v.CardRand))
			selectApplet(t, a)
			p, _ := protocol.ProfileByName(v.Profile)
			c, sw := personalize(t, a, p, v.IssuerSPKI)
			if sw != iso7816.SWOK || !bytes.Equal(c, v.C) {
				t.Fatalf("PERSONALIZE = %x %v, want c = %x", c, sw, v.C)
			}
			if _, sw := exchange(t, a, cmd(protocol.INSLock, lockHash(c), 0)); sw != iso7816.SWOK {
				t.Fatalf("LOCK: %v", sw)
			}
			mac, sw := exchange(t, a, cmd(protocol.INSAuthenticate, v.Challenge, 256))
			if sw != iso7816.SWOK || !bytes.Equal(mac, v.MAC) {
				t.Fatalf("AUTHENTICATE = %x %v, want %x", mac, sw, v.MAC)
			}
		})
	}
}

func TestLifeCycle(t *testing.T) {
	v := vectors(t)[0]
	other := vectors(t)[1] // another issuer key
	p, _ := protocol.ProfileByName(v.Profile)
	a := newCard(t, Options{})
	selectApplet(t, a)
	challenge := make([]byte, 16)

	status := func() protocol.Status {
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
	if s := status(); s.State != protocol.Blank || s.ProfileID != 0 {
		t.Fatalf("new card status %+v", s)
	}
	id, sw := exchange(t, a, cmd(protocol.INSGetID, nil, 256))
	if sw != iso7816.SWOK || !bytes.Equal(id, a.ID()) {
		t.Fatalf("GET ID = %x %v", id, sw)
	}
	// Blank: nothing to read back, lock or authenticate.
	for _, c := range []iso7816.Command{
		cmd(protocol.INSReadCiphertext, nil, 256),
		cmd(protocol.INSLock, make([]byte, 32), 0),
		cmd(protocol.INSAuthenticate, challenge, 256),
	} {
		if _, sw := exchange(t, a, c); sw != iso7816.SWConditionsNotMet {
			t.Errorf("blank card INS %02X: %v, want 6985", c.INS, sw)
		}
	}

	c, sw := personalize(t, a, p, v.IssuerSPKI)
	if sw != iso7816.SWOK || len(c) != len(v.C) {
		t.Fatalf("PERSONALIZE: %v", sw)
	}
	if s := status(); s.State != protocol.Personalized || s.ProfileID != p.ID || !bytes.Equal(s.Fingerprint[:], v.Fingerprint) {
		t.Fatalf("personalized status %+v", s)
	}
	// Twice refused, whatever the key.
	if _, sw := personalize(t, a, p, other.IssuerSPKI); sw != iso7816.SWConditionsNotMet {
		t.Fatalf("second PERSONALIZE: %v, want 6985", sw)
	}
	// Read back until locked, across a power cycle and a reopened state file.
	a.PowerOff()
	a.PowerOn()
	if _, sw := exchange(t, a, cmd(protocol.INSReadCiphertext, nil, 256)); sw != iso7816.SWCommandNotAllowed {
		t.Fatalf("after power cycle, unselected READ: %v, want 6986", sw)
	}
	a, err := Open(a.Path())
	if err != nil {
		t.Fatal(err)
	}
	selectApplet(t, a)
	back, sw := exchange(t, a, cmd(protocol.INSReadCiphertext, nil, 256))
	if sw != iso7816.SWOK || !bytes.Equal(back, c) {
		t.Fatalf("READ CIPHERTEXT = %v, want the PERSONALIZE answer", sw)
	}
	if _, sw := exchange(t, a, cmd(protocol.INSAuthenticate, challenge, 256)); sw != iso7816.SWConditionsNotMet {
		t.Fatalf("AUTHENTICATE before LOCK: %v, want 6985", sw)
	}
	// LOCK only with the hash of the right c.
	if _, sw := exchange(t, a, cmd(protocol.INSLock, lockHash(c[1:]), 0)); sw != iso7816.SWWrongData {
		t.Fatalf("LOCK with a wrong hash: %v, want 6A80", sw)
	}
	if _, sw := exchange(t, a, cmd(protocol.INSLock, lockHash(c), 0)); sw != iso7816.SWOK {
		t.Fatalf("LOCK: %v", sw)
	}
	// Locked: c is erased, from the session and from the state file.
	if _, sw := exchange(t, a, cmd(protocol.INSReadCiphertext, nil, 256)); sw != iso7816.SWConditionsNotMet {
		t.Fatalf("READ after LOCK: %v, want 6985", sw)
	}
	raw, _ := os.ReadFile(a.Path())
	if bytes.Contains(raw, []byte(hex.EncodeToString(c))) {
		t.Fatal("state file still holds c after LOCK")
	}
	if _, sw := exchange(t, a, cmd(protocol.INSLock, lockHash(c), 0)); sw != iso7816.SWConditionsNotMet {
		t.Fatalf("second LOCK: %v", sw)
	}
	if _, sw := personalize(t, a, p, v.IssuerSPKI); sw != iso7816.SWConditionsNotMet {
		t.Fatalf("PERSONALIZE after LOCK: %v", sw)
	}
	if s := status(); s.State != protocol.Locked || !bytes.Equal(s.Fingerprint[:], v.Fingerprint) {
		t.Fatalf("locked status %+v", s)
	}
	mac, sw := exchange(t, a, cmd(protocol.INSAuthenticate, challenge, 256))
	if sw != iso7816.SWOK || len(mac) != protocol.MACLen {
		t.Fatalf("AUTHENTICATE: %x %v", mac, sw)
	}
}

// §4.4: a card with a pinned fingerprint refuses any other issuer key and
// stays blank, so the attacker cannot even cause a denial of service.
func TestPinnedFingerprint(t *testing.T) {
	vs := vectors(t)
	genuine, attacker := vs[8], vs[9] // both P-256; same key, so pick another
	if !bytes.Equal(genuine.IssuerSPKI, attacker.IssuerSPKI) {
		t.Fatal("vector order changed")
	}
	attackerSPKI := readSPKI(t, "../testdata/keys/p256-attacker.pem")
	a := newCard(t, Options{Pinned: genuine.Fingerprint})
	selectApplet(t, a)
	if _, sw := personalize(t, a, protocol.ECDHP256X963, attackerSPKI); sw != iso7816.SWSecurityStatus {
		t.Fatalf("foreign key: %v, want 6982", sw)
	}
	if a.LifeCycle() != protocol.Blank {
		t.Fatal("refused PERSONALIZE changed the card")
	}
	if _, sw := personalize(t, a, protocol.ECDHP256X963, genuine.IssuerSPKI); sw != iso7816.SWOK {
		t.Fatalf("pinned key: %v", sw)
	}
	b, _ := exchange(t, a, cmd(protocol.INSGetStatus, nil, 256))
	if s, _ := protocol.ParseStatus(b); !s.Pinned || !bytes.Equal(s.PinnedKey[:], genuine.Fingerprint) {
		t.Fatalf("status does not show the pin: %+v", s)
	}
}

func readSPKI(t testing.TB, path string) []byte {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	blk, _ := pem.Decode(b)
	if blk == nil {
		t.Fatalf("%s: no PEM block", path)
	}
	priv, err := x509.ParsePKCS8PrivateKey(blk.Bytes)
	if err != nil {
		t.Fatal(err)
	}
	spki, err := x509.MarshalPKIXPublicKey(priv.(crypto.Signer).Public())
	if err != nil {
		t.Fatal(err)
	}
	return spki
}

// Status words for malformed and misplaced commands, on a selected blank
// card unless the case says otherwise.
func TestStatusWords(t *testing.T) {
	v := vectors(t)[3]
	aid := hex.EncodeToString(protocol.AID)
	for _, tc := range []struct {
		name     string
		selected bool
		apdu     string
		want     iso7816.SW
	}{
		{"short header", true, "80 10 00", iso7816.SWWrongLength},
		{"Lc larger than data", true, "80 10 00 00 05 01 02", iso7816.SWWrongLength},
		{"extended length", true, "80 10 00 00 00 00 10", iso7816.SWWrongLength},
		{"not selected", false, "80 10 00 00 00", iso7816.SWCommandNotAllowed},
		{"select other AID", false, "00 A4 04 00 05 A0 00 00 00 03", iso7816.SWAppletNotFound},
		{"select by file id", false, "00 A4 00 00 02 3F 00", iso7816.SWWrongP1P2},
		{"select without response", false, "00 A4 04 0C 0C " + aid, iso7816.SWOK},
		{"logical channel", true, "81 10 00 00 00", iso7816.SWLogicalChannel},
		{"secure messaging", true, "8C 10 00 00 00", iso7816.SWSecureMessaging},
		{"bad class", true, "A0 10 00 00 00", iso7816.SWCLANotSupported},
		{"proprietary INS in ISO class", true, "00 10 00 00 00", iso7816.SWCLANotSupported},
		{"unknown INS", true, "80 EE 00 00 00", iso7816.SWINSNotSupported},
		{"GET ID with P1", true, "80 10 01 00 00", iso7816.SWWrongP1P2},
		{"GET ID with data", true, "80 10 00 00 01 00", iso7816.SWWrongLength},
		{"chaining on GET ID", true, "90 10 00 00 00", iso7816.SWChainingUnsupported},
		{"GET RESPONSE with nothing pending", true, "00 C0 00 00 00", iso7816.SWConditionsNotMet},
		{"PERSONALIZE unknown profile", true, "80 20 09 00 05 3003020100", iso7816.SWWrongP1P2},
		{"PERSONALIZE garbage key", true, "80 20 02 00 05 3003020100", iso7816.SWWrongData},
		{"PERSONALIZE EC key for RSA profile", true, "80 20 02 00 5B " + hex.EncodeToString(readSPKI(t, "../testdata/keys/p256.pem")), iso7816.SWWrongData},
		{"LOCK short hash", true, "80 24 00 00 02 0000", iso7816.SWWrongLength},
		{"AUTHENTICATE short challenge", true, "80 30 00 00 02 0000 00", iso7816.SWWrongLength},
	} {
		t.Run(tc.name, func(t *testing.T) {
			a := newCard(t, Options{})
			if tc.selected {
				selectApplet(t, a)
			}
			if _, sw := send(t, a, apdu(tc.apdu)); sw != tc.want {
				t.Fatalf("%s: %v, want %v", tc.apdu, sw, tc.want)
			}
		})
	}

	t.Run("broken chain", func(t *testing.T) {
		a := newCard(t, Options{})
		selectApplet(t, a)
		first := iso7816.Chain(cmd(protocol.INSPersonalize, v.IssuerSPKI, 256), protocol.CLAChaining)[0]
		first.P1 = protocol.RSAOAEPSHA1.ID
		b, _ := first.Bytes()
		if _, sw := send(t, a, b); sw != iso7816.SWOK {
			t.Fatalf("first link: %v", sw)
		}
		if _, sw := send(t, a, apdu("80 12 00 00 00")); sw != iso7816.SWLastCommandExpected {
			t.Fatalf("other command mid-chain: %v, want 6883", sw)
		}
		if a.LifeCycle() != protocol.Blank {
			t.Fatal("broken chain personalized the card")
		}
		// The chain is gone: a full PERSONALIZE works from scratch.
		if _, sw := personalize(t, a, protocol.RSAOAEPSHA1, v.IssuerSPKI); sw != iso7816.SWOK {
			t.Fatalf("PERSONALIZE after broken chain: %v", sw)
		}
	})

	t.Run("chain too long", func(t *testing.T) {
		a := newCard(t, Options{})
		selectApplet(t, a)
		big := iso7816.Command{CLA: protocol.CLAProprietary, INS: protocol.INSPersonalize, P1: 2, Data: make([]byte, protocol.MaxChainedData+1)}
		_, sw := exchange(t, a, big)
		if sw != iso7816.SWNotEnoughMemory {
			t.Fatalf("oversized chain: %v, want 6A84", sw)
		}
	})

	t.Run("response in pieces", func(t *testing.T) {
		a := newCard(t, Options{})
		selectApplet(t, a)
		// Le = 10: ten bytes now, the rest announced with 61xx.
		data, sw := send(t, a, apdu("80 12 00 00 0A"))
		if len(data) != 10 || sw != iso7816.SWBytesRemaining|58 {
			t.Fatalf("GET STATUS Le=10: %d bytes, %v", len(data), sw)
		}
		rest, sw := send(t, a, apdu("00 C0 00 00 3A"))
		if len(rest) != 58 || sw != iso7816.SWOK {
			t.Fatalf("GET RESPONSE: %d bytes, %v", len(rest), sw)
		}
		if _, err := protocol.ParseStatus(append(data, rest...)); err != nil {
			t.Fatal(err)
		}
		// Without Le the whole response waits for GET RESPONSE.
		if data, sw := send(t, a, apdu("80 10 00 00")); len(data) != 0 || sw != iso7816.SWBytesRemaining|4 {
			t.Fatalf("GET ID without Le: %x %v", data, sw)
		}
	})

	t.Run("power cycle drops the session", func(t *testing.T) {
		a := newCard(t, Options{})
		selectApplet(t, a)
		send(t, a, apdu("80 10 00 00"))
		a.Reset()
		if _, sw := send(t, a, apdu("00 C0 00 00 04")); sw != iso7816.SWCommandNotAllowed {
			t.Fatalf("GET RESPONSE after reset: %v", sw)
		}
	})
}

// A state write that fails leaves the card as it was and says 6581.
func TestPersistFailureLeavesCardBlank(t *testing.T) {
	v := vectors(t)[3]
	dir := t.TempDir()
	a, err := Manufacture(filepath.Join(dir, "sub", "card.json"), Options{ID: []byte{1}})
	if err == nil {
		t.Fatal("manufacture into a missing directory succeeded")
	}
	if err := os.Mkdir(filepath.Join(dir, "sub"), 0o700); err != nil {
		t.Fatal(err)
	}
	a, err = Manufacture(filepath.Join(dir, "sub", "card.json"), Options{ID: []byte{1}})
	if err != nil {
		t.Fatal(err)
	}
	selectApplet(t, a)
	if err := os.RemoveAll(filepath.Join(dir, "sub")); err != nil {
		t.Fatal(err)
	}
	if _, sw := personalize(t, a, protocol.RSAOAEPSHA1, v.IssuerSPKI); sw != iso7816.SWMemoryFailure {
		t.Fatalf("PERSONALIZE with no storage: %v, want 6581", sw)
	}
	if a.LifeCycle() != protocol.Blank {
		t.Fatal("card changed although its state was not written")
	}
}

func TestManufacture(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "c.json")
	for _, o := range []Options{{ID: nil}, {ID: make([]byte, 17)}, {ID: []byte{1}, Pinned: []byte{1, 2}}} {
		if _, err := Manufacture(path, o); err == nil {
			t.Errorf("Manufacture(%+v) accepted", o)
		}
	}
	if _, err := Manufacture(path, Options{ID: []byte{1}}); err != nil {
		t.Fatal(err)
	}
	if _, err := Manufacture(path, Options{ID: []byte{2}}); err == nil {
		t.Fatal("Manufacture overwrote a card")
	}
	if err := os.WriteFile(path, []byte(`{"format":"blindperso-vcard/1","id":"01","life_cycle":"locked"}`), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := Open(path); err == nil || !strings.Contains(err.Error(), "K_I") {
		t.Fatalf("Open of a locked card without a key: %v", err)
	}
}

// An RSA issuer key with an even modulus (no RSA key has one) is refused
// as incorrect data, like any other key that is not an issuer key.
func TestPersonalizeEvenModulus(t *testing.T) {
	k, err := x509.ParsePKIXPublicKey(readSPKI(t, "../testdata/keys/rsa2048.pem"))
	if err != nil {
		t.Fatal(err)
	}
	pub := *k.(*rsa.PublicKey)
	pub.N = new(big.Int).Add(pub.N, big.NewInt(1))
	spki, err := x509.MarshalPKIXPublicKey(&pub)
	if err != nil {
		t.Fatal(err)
	}
	a := newCard(t, Options{})
	selectApplet(t, a)
	if _, sw := personalize(t, a, protocol.RSAOAEPAES, spki); sw != iso7816.SWWrongData {
		t.Fatalf("even modulus: %v, want %v", sw, iso7816.SWWrongData)
	}
}
