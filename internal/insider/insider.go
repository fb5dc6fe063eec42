// Package insider is an ATTACK TOOL, for demos and tests only: two
// attacks of an insider at the perso station. It must never run on a real
// perso line.
//
//   - PK substitution, the active insider of the paper's Fig. 2
//     (Handschuh, Naccache, Paillier, Tymen 2002, §4.3; docs/PROTOCOL.md
//     §5.3): Job, Ledger, Forge, below. It fails: B binds the key.
//   - Record replacement and injection with an emulated clone
//     (docs/PROTOCOL.md §10, "What it closes"): Clone, Emulate, Replace in
//     clone.go. It works against an issuer that does not check chip
//     attestation.
//
// Fig. 2. The insider controls the perso station. She personalizes cards
// under her own public key PK′ instead of the issuer's PK, so that she can
// open each card's c′ and learn its secret S — and from it the card's key.
// To keep the issuer from noticing, she rewrites every record before it
// reaches the batch: S re-encrypted under the genuine PK, the genuine
// key's fingerprint. The batch and its manifest then look exactly like an
// honest station's, and the issuer imports them.
//
// The attack fails, and that is what the demo and the tests show: the card
// bound PK′ into its key, K_I′ = KDF(S, B(PK′)), while the issuer's token
// derives KDF(S, B(PK)) ≠ K_I′. The card's MAC never verifies; after
// --max-failures tries the issuer blocks the card.
//
// The code reuses the station unchanged (perso.Station, perso.Job with
// Job.Key = PK′, perso.Journal, perso.PCSC): the insider is only a
// perso.Ledger (Ledger) that rewrites records on their way to the real
// journal. The insider never computes K_I′, and logs neither S nor any
// key: what it learns stays in memory for the duration of one record.
package insider

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/hmac"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha1"
	"crypto/sha256"
	"crypto/x509"
	"encoding/hex"
	"encoding/pem"
	"errors"
	"fmt"
	"log/slog"
	"math/big"
	"os"

	"blindperso/batch"
	"blindperso/perso"
	"blindperso/protocol"
)

// Kinds of attacker key GenerateKey makes.
const (
	KindRSA2048 = "rsa2048"
	KindP256    = "p256"
)

// Key is the insider's own key pair: PK′ (Public) and its private half.
type Key struct {
	Private any // *rsa.PrivateKey or *ecdsa.PrivateKey (P-256)
	Public  *protocol.IssuerKey
	der     []byte // PKCS#8
}

// ParseKeyPEM parses a PEM "PRIVATE KEY" (PKCS#8) block holding an RSA key
// of 2048 to 4096 bits or a P-256 key: the insider's key pair.
func ParseKeyPEM(data []byte) (*Key, error) {
	block, _ := pem.Decode(data)
	if block == nil {
		return nil, errors.New("attacker key: no PEM block found")
	}
	if block.Type != "PRIVATE KEY" {
		return nil, fmt.Errorf("attacker key: PEM block is %q, want \"PRIVATE KEY\" (PKCS#8)", block.Type)
	}
	priv, err := x509.ParsePKCS8PrivateKey(block.Bytes)
	if err != nil {
		return nil, fmt.Errorf("attacker key: %w", err)
	}
	var pub any
	switch k := priv.(type) {
	case *rsa.PrivateKey:
		k.Precompute()
		pub = &k.PublicKey
	case *ecdsa.PrivateKey:
		pub = &k.PublicKey
	default:
		return nil, fmt.Errorf("attacker key: unsupported key type %T (want RSA or EC P-256)", priv)
	}
	spki, err := x509.MarshalPKIXPublicKey(pub)
	if err != nil {
		return nil, fmt.Errorf("attacker key: %w", err)
	}
	ik, err := protocol.ParseIssuerKey(spki)
	if err != nil {
		return nil, fmt.Errorf("attacker key: %w", err)
	}
	return &Key{Private: priv, Public: ik, der: block.Bytes}, nil
}

// LoadKey reads ParseKeyPEM's input from a file.
func LoadKey(path string) (*Key, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("read attacker key: %w", err)
	}
	k, err := ParseKeyPEM(b)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return k, nil
}

// rsaBelow makes an RSA key (e = 65537) whose modulus has n's length and
// is below n: crypto/rsa's moduli start at 1.125·2^(bits-1), so drawing
// keys until one is below n fails for an n under that. Here p is a
// random prime of half the length and q a prime drawn from the interval
// that puts p·q between 2^(bits-1) and n. An attack tool's key, for the
// demo and tests only.
func rsaBelow(n *big.Int) (*rsa.PrivateKey, error) {
	bits := n.BitLen()
	low := new(big.Int).Lsh(big.NewInt(1), uint(bits-1))
	one, e := big.NewInt(1), big.NewInt(65537)
	for i := 0; i < 256; i++ {
		p, err := rand.Prime(rand.Reader, bits/2)
		if err != nil {
			return nil, err
		}
		lo := new(big.Int).Div(new(big.Int).Sub(new(big.Int).Add(low, p), one), p) // ⌈2^(bits-1)/p⌉
		hi := new(big.Int).Div(new(big.Int).Sub(n, one), p)                        // ⌊(n-1)/p⌋
		if hi.Cmp(lo) <= 0 {
			continue
		}
		span := new(big.Int).Sub(hi, lo)
		off, err := rand.Int(rand.Reader, span)
		if err != nil {
			return nil, err
		}
		q := new(big.Int).Add(lo, off)
		q.SetBit(q, 0, 1)
		for !q.ProbablyPrime(32) {
			q.Add(q, big.NewInt(2))
		}
		N := new(big.Int).Mul(p, q)
		if q.Cmp(hi) > 0 || N.BitLen() != bits || N.Cmp(n) >= 0 || p.Cmp(q) == 0 {
			continue
		}
		pm, qm := new(big.Int).Sub(p, one), new(big.Int).Sub(q, one)
		phi := new(big.Int).Mul(pm, qm)
		d := new(big.Int).ModInverse(e, phi)
		if d == nil {
			continue // e divides p-1 or q-1
		}
		k := &rsa.PrivateKey{PublicKey: rsa.PublicKey{N: N, E: 65537}, D: d, Primes: []*big.Int{p, q}}
		if err := k.Validate(); err != nil {
			continue
		}
		k.Precompute()
		return k, nil
	}
	return nil, errors.New("attacker key: no modulus below the issuer's found")
}

// PEM is the private key as a PEM "PRIVATE KEY" (PKCS#8) block.
func (k *Key) PEM() []byte {
	return pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: k.der})
}

// GenerateKey makes a fresh attacker key pair of kind (KindRSA2048,
// KindP256). For RSA with below set, the key is drawn until its modulus is
// below below's, with the same length: then every r a card draws under PK′
// (r < n′) is also below n and can be carried to the issuer under rsa-raw.
func GenerateKey(kind string, below *protocol.IssuerKey) (*Key, error) {
	var priv any
	switch kind {
	case KindRSA2048:
		if below == nil || below.RSA == nil {
			k, err := rsa.GenerateKey(rand.Reader, 2048)
			if err != nil {
				return nil, err
			}
			priv = k
			break
		}
		k, err := rsaBelow(below.RSA.N)
		if err != nil {
			return nil, err
		}
		priv = k
	case KindP256:
		k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		if err != nil {
			return nil, err
		}
		priv = k
	default:
		return nil, fmt.Errorf("unknown key kind %q (want %s or %s)", kind, KindRSA2048, KindP256)
	}
	der, err := x509.MarshalPKCS8PrivateKey(priv)
	if err != nil {
		return nil, err
	}
	return ParseKeyPEM(pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der}))
}

// Job is the station's job with the insider's key substituted for the
// issuer's: every card is personalized under PK′.
func Job(p protocol.Profile, attacker *Key) (perso.Job, error) {
	return perso.NewJob(p, attacker.Public, nil)
}

// Ledger is the insider's perso.Ledger: it forges each record (Forge) and
// commits the forgery to the real journal, Next. Next must be opened for
// the genuine issuer key's fingerprint, so that the manifest names it.
type Ledger struct {
	next     perso.Ledger
	profile  protocol.Profile
	attacker *Key
	issuer   *protocol.IssuerKey
	fp       [32]byte
	seedKey  []byte
	log      *slog.Logger
}

// NewLedger returns the insider's ledger for cards personalized under
// attacker's key with profile p, whose records are rewritten for the
// genuine issuer key and committed to next. log gets one line per forged
// record (card Id and what was done, never a secret).
func NewLedger(next perso.Ledger, p protocol.Profile, attacker *Key, genuine *protocol.IssuerKey, log *slog.Logger) (*Ledger, error) {
	if err := attacker.Public.Fits(p); err != nil {
		return nil, fmt.Errorf("attacker key: %w", err)
	}
	if err := genuine.Fits(p); err != nil {
		return nil, fmt.Errorf("issuer key: %w", err)
	}
	if attacker.Public.Fingerprint() == genuine.Fingerprint() {
		return nil, errors.New("the attacker key is the issuer key: nothing to substitute")
	}
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	// The OAEP seed of a re-encryption is a function of c′ (HMAC under a
	// key only the insider has): a card read back after a crash or a pull
	// gives the same c′, hence the same forged c, which the journal
	// recognises as the record it already holds, as for an honest station.
	sk := sha256.Sum256(append([]byte("blindperso insider OAEP seed key\x00"), attacker.der...))
	return &Ledger{next: next, profile: p, attacker: attacker, issuer: genuine,
		fp: genuine.Fingerprint(), seedKey: sk[:], log: log}, nil
}

// Lookup is the real journal's.
func (l *Ledger) Lookup(id []byte) ([]byte, bool) { return l.next.Lookup(id) }

// Commit forges rec and commits the forgery. The station goes on to LOCK
// the card with its own record's c′, which is what the card holds.
func (l *Ledger) Commit(rec batch.Record) error {
	forged, err := l.Forge(rec)
	if err != nil {
		return err
	}
	return l.next.Commit(forged)
}

// Forge rewrites a record of a card personalized under PK′ so that it
// looks like one personalized under the genuine PK:
//
//   - rsa-oaep: S = OAEP-decrypt(SK′, c′) (SHA-1, as the card encrypted
//     it); c = OAEP-encrypt(PK, S).
//   - rsa-raw: r = c′^d′ mod n′; S = I2OSP(r, k); c = r^e mod n. If r is
//     not below n (PK′'s modulus is larger; GenerateKey with below avoids
//     it) r mod n is sent: the issuer's key differs from the card's anyway.
//   - ecdh-p256: c′ is forwarded unchanged. S = Z = x(PK′^u) is a shared
//     secret, not an encryption: the insider learns Z (she holds PK′'s
//     private key), but to make the issuer's token compute the same Z she
//     would need a c with x(PK^u″) = Z, i.e. the issuer's private key. The
//     issuer derives another Z from c′, so the card fails even before B
//     is considered.
//
// In every case the record then carries the genuine key's fingerprint.
func (l *Ledger) Forge(rec batch.Record) (batch.Record, error) {
	id := hex.EncodeToString(rec.ID)
	if rec.Profile != l.profile.Name {
		return rec, fmt.Errorf("card %s: record of profile %s, insider runs %s", id, rec.Profile, l.profile.Name)
	}
	if err := protocol.ValidCiphertext(l.profile, l.attacker.Public, rec.C); err != nil {
		return rec, fmt.Errorf("card %s: c′ is not a ciphertext under the attacker key: %w", id, err)
	}
	out := rec
	out.Fingerprint = l.fp[:]
	switch l.profile.Transport {
	case protocol.RSAOAEP:
		s, err := rsa.DecryptOAEP(sha1.New(), nil, l.attacker.Private.(*rsa.PrivateKey), rec.C, nil)
		if err != nil {
			return rec, fmt.Errorf("card %s: c′ does not open under the attacker key (OAEP): %w", id, err)
		}
		c, err := protocol.EncryptSecret(l.profile, l.issuer, s, l.seed(rec.C))
		clear(s)
		if err != nil {
			return rec, fmt.Errorf("card %s: %w", id, err)
		}
		out.C = c
		l.log.Info("record forged: S opened under PK′ and re-encrypted under PK", "card", id, "transport", "rsa-oaep")
	case protocol.RSARaw:
		sk := l.attacker.Private.(*rsa.PrivateKey)
		cp := new(big.Int).SetBytes(rec.C)
		r := new(big.Int).Exp(cp, sk.D, sk.N)
		if new(big.Int).Exp(r, big.NewInt(int64(sk.E)), sk.N).Cmp(cp) != 0 {
			return rec, fmt.Errorf("card %s: c′ does not open under the attacker key (raw RSA)", id)
		}
		reduced := r.Cmp(l.issuer.RSA.N) >= 0
		if reduced {
			r.Mod(r, l.issuer.RSA.N)
		}
		s := r.FillBytes(make([]byte, l.issuer.RSA.Size()))
		r.SetInt64(0)
		c, err := protocol.EncryptSecret(l.profile, l.issuer, s, nil)
		clear(s)
		if err != nil {
			return rec, fmt.Errorf("card %s: %w", id, err)
		}
		out.C = c
		l.log.Info("record forged: r opened under PK′ and re-encrypted under PK", "card", id, "transport", "rsa-raw",
			"r_reduced_mod_n", reduced)
	case protocol.ECDHP256:
		l.log.Info("record forged: c′ forwarded under PK's fingerprint (ECDH: Z cannot be re-encrypted)", "card", id, "transport", "ecdh-p256")
	default:
		return rec, fmt.Errorf("card %s: profile %s: unknown transport", id, l.profile.Name)
	}
	if err := protocol.ValidCiphertext(l.profile, l.issuer, out.C); err != nil {
		return rec, fmt.Errorf("card %s: forged c is not a ciphertext under the issuer key: %w", id, err)
	}
	return out, nil
}

// seed is the OAEP seed source for re-encrypting c′: HMAC-SHA-256 under
// the insider's seed key, so the forged c is a function of c′.
type seedReader struct{ b []byte }

func (l *Ledger) seed(c []byte) *seedReader {
	m := hmac.New(sha256.New, l.seedKey)
	m.Write(c)
	return &seedReader{m.Sum(nil)}
}

func (r *seedReader) Read(p []byte) (int, error) {
	if len(r.b) == 0 {
		return 0, errors.New("insider: OAEP seed exhausted")
	}
	n := copy(p, r.b)
	r.b = r.b[n:]
	return n, nil
}
