// Command vcard makes virtual blindperso cards and feeds them, one after
// another, into a vpcd reader of a running pcscd, so a perso station talks
// to them through the real PC/SC stack.
package main

import (
	"context"
	"crypto/x509"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"math/big"
	"os"
	"os/signal"
	"path/filepath"
	"syscall"
	"time"

	"github.com/spf13/cobra"

	"blindperso/api"
	"blindperso/card"
	"blindperso/chipca"
	"blindperso/internal/pcscd"
	"blindperso/internal/vcard"
	"blindperso/protocol"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := root().ExecuteContext(ctx); err != nil {
		os.Exit(1)
	}
}

func root() *cobra.Command {
	c := &cobra.Command{
		Use:   "vcard",
		Short: "Virtual blindperso cards on a real pcscd, through vsmartcard's vpcd",
		Long: `vcard makes virtual cards (each a state file, its "EEPROM") and inserts
them into a vpcd reader slot of pcscd, one after another, as a perso
machine feeds cards. The perso station then sees them through PC/SC like
physical cards.

A typical session:

  vcard pcscd --dir /tmp/pc &            # a private pcscd with two vpcd slots
  export PCSCLITE_CSOCK_NAME=/tmp/pc/pcscd.comm
  vcard manufacture --dir cards --count 5
  vcard feed --reader 127.0.0.1:PORT cards/*.json

Attested cards (docs/PROTOCOL.md §10) need a chip vendor; vcard plays a
test one:

  vcard chip-ca init --out chip-ca       # root.pem goes to the issuer
  vcard manufacture --dir cards --count 5 --chip-ca chip-ca`,
		SilenceUsage: true,
	}
	c.AddCommand(manufactureCmd(), feedCmd(), statusCmd(), authenticateCmd(), pcscdCmd(), chipCACmd())
	return c
}

func manufactureCmd() *cobra.Command {
	var dir, firstID, pin, chipCA string
	var count int
	c := &cobra.Command{
		Use:   "manufacture",
		Short: "Make blank cards: one state file each, with sequential Ids",
		Long: `Make --count blank cards in --dir, named card-<ID>.json. Ids are 8 bytes,
counting up from --first-id. --pin sets the issuer-key fingerprint the
cards will accept (the paper's §4.4 "PK masked into ROM"); without it they
accept any key.

--chip-ca DIR makes attested cards (docs/PROTOCOL.md §10): each gets a
fresh P-256 attestation key and a certificate for its Id from the chip
vendor CA in DIR (made by vcard chip-ca init), and signs what it makes on
PERSONALIZE. An issuer that trusts DIR/root.pem can then tell the card's
records from a station's forgeries. Without --chip-ca the cards are
unattested, as a card of protocol version 1 alone.`,
		Example: `  vcard manufacture --dir cards --count 10
  vcard manufacture --dir cards --count 10 --pin $(issuer fingerprint issuer.pub.pem)
  vcard manufacture --dir cards --count 10 --chip-ca chip-ca`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			first, err := hex.DecodeString(firstID)
			if err != nil || len(first) != 8 {
				return fmt.Errorf("--first-id must be 16 hex digits, got %q", firstID)
			}
			var pinned []byte
			if pin != "" {
				if pinned, err = hex.DecodeString(pin); err != nil || len(pinned) != 32 {
					return fmt.Errorf("--pin must be a SHA-256 fingerprint, 64 hex digits, got %q", pin)
				}
			}
			var ca *chipca.CA
			if chipCA != "" {
				if ca, err = chipca.Load(chipCA); err != nil {
					return fmt.Errorf("--chip-ca: %w", err)
				}
			}
			if err := os.MkdirAll(dir, 0o700); err != nil {
				return err
			}
			id := new(big.Int).SetBytes(first)
			for range count {
				b := id.FillBytes(make([]byte, 8))
				path := filepath.Join(dir, fmt.Sprintf("card-%X.json", b))
				o := card.Options{ID: b, Pinned: pinned}
				if ca != nil {
					at, err := ca.NewCard(b, chipca.CertOptions{})
					if err != nil {
						return err
					}
					o.Attestation = (*card.Attestation)(&at)
				}
				if _, err := card.Manufacture(path, o); err != nil {
					return err
				}
				fmt.Fprintln(cmd.OutOrStdout(), path)
				id.Add(id, big.NewInt(1))
			}
			return nil
		},
	}
	c.Flags().StringVar(&dir, "dir", "cards", "directory for the card state files")
	c.Flags().IntVar(&count, "count", 1, "number of cards")
	c.Flags().StringVar(&firstID, "first-id", "B100000000000001", "Id of the first card, 16 hex digits")
	c.Flags().StringVar(&pin, "pin", "", "SHA-256 fingerprint of the only issuer key the cards accept (hex)")
	c.Flags().StringVar(&chipCA, "chip-ca", "", "chip vendor CA directory (vcard chip-ca init): make attested cards")
	return c
}

func chipCACmd() *cobra.Command {
	c := &cobra.Command{
		Use:   "chip-ca",
		Short: "A test chip vendor's CA, which certifies attested cards",
		Long: `A chip vendor certifies each chip's attestation key at manufacture, outside
the personalization centre (docs/PROTOCOL.md §10.1); the issuer trusts the
vendor's root and checks every record's attestation against it. This
command plays a test vendor: init makes its CA, vcard manufacture --chip-ca
uses it. It is for tests and demos: a real vendor's keys live in its HSM.`,
		Args: cobra.NoArgs,
	}
	c.AddCommand(chipCAInitCmd())
	return c
}

func chipCAInitCmd() *cobra.Command {
	var out, vendor string
	c := &cobra.Command{
		Use:   "init --out DIR",
		Short: "Make a chip vendor CA: a P-256 root and an intermediate that issues card certificates",
		Long: `Make a fresh test chip vendor CA in --out (created if missing):

  root.pem              self-signed root; give this to the issuer to trust
  root.key.pem          its key (PKCS#8, mode 0600); may be moved offline
  intermediate.pem      CA under the root, path length 0; cards carry it
  intermediate.key.pem  its key (PKCS#8, mode 0600); signs card certificates

It refuses to overwrite an existing CA: the issuer may already trust its
root. It prints the root's fingerprint, SHA-256 of root.pem's DER, the
value to compare when installing root.pem at the issuer (openssl x509
-in root.pem -noout -fingerprint -sha256 shows the same, with colons).`,
		Example: `  vcard chip-ca init --out chip-ca
  vcard manufacture --dir cards --count 10 --chip-ca chip-ca`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			ca, err := chipca.New(vendor)
			if err != nil {
				return err
			}
			if err := ca.Write(out); err != nil {
				return err
			}
			fp := ca.RootFingerprint()
			w := cmd.OutOrStdout()
			fmt.Fprintf(w, "chip vendor CA in %s\n", out)
			fmt.Fprintf(w, "root SHA-256 fingerprint %x\n", fp[:])
			return nil
		},
	}
	c.Flags().StringVar(&out, "out", "", "directory for the CA's files (required)")
	c.Flags().StringVar(&vendor, "vendor", chipca.DefaultVendor, "vendor name, the O= of the CA certificates")
	c.MarkFlagRequired("out")
	return c
}

func feedCmd() *cobra.Command {
	var reader string
	var eject, gap time.Duration
	c := &cobra.Command{
		Use:   "feed CARD.json...",
		Short: "Insert cards into a vpcd reader one after another",
		Long: `Insert each card into the vpcd slot at --reader (host:port of the vpcd
driver inside pcscd). A card is ejected once it is locked and the station
has released it (powered it off or reset it), or --eject-after a lock at the
latest; the next card follows after --gap. Cards already locked are skipped.
Ends when every card has been through, or on SIGINT/SIGTERM.`,
		Example: `  vcard feed --reader 127.0.0.1:35963 cards/*.json`,
		Args:    cobra.MinimumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			f := &vcard.Feeder{Addr: reader, Cards: args, EjectAfter: eject, Gap: gap,
				Log: slog.New(slog.NewTextHandler(cmd.ErrOrStderr(), nil))}
			return f.Run(cmd.Context())
		},
	}
	c.Flags().StringVar(&reader, "reader", "127.0.0.1:35963", "vpcd slot to connect to, host:port")
	c.Flags().DurationVar(&eject, "eject-after", 2*time.Second, "eject a locked card after this long even if the station keeps it")
	c.Flags().DurationVar(&gap, "gap", 500*time.Millisecond, "pause between one card's removal and the next one's insertion")
	return c
}

func statusCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "status CARD.json...",
		Short: "Print each card's Id, life cycle and issuer-key fingerprint as JSON lines (never its key)",
		Long: `Print one JSON line per card: file, id, state (blank, personalized,
locked), profile and issuer_fingerprint once personalized,
pinned_fingerprint if the card has a pin, and attested (true when the card
has an attestation key, docs/PROTOCOL.md §10; then attestation_subject is
its certificate's subject). Never K_I or any other key.`,
		Args: cobra.MinimumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			enc := json.NewEncoder(cmd.OutOrStdout())
			for _, path := range args {
				a, err := card.Open(path)
				if err != nil {
					return err
				}
				c := &card.Client{T: a.Local()}
				if err := c.Select(); err != nil {
					return err
				}
				st, err := c.Status()
				if err != nil {
					return err
				}
				out := map[string]any{"file": path, "id": protocol.Hex(a.ID()), "state": st.State}
				if p, err := protocol.ProfileByID(st.ProfileID); err == nil {
					out["profile"] = p.Name
					out["issuer_fingerprint"] = protocol.Hex(st.Fingerprint[:])
				}
				if st.Pinned {
					out["pinned_fingerprint"] = protocol.Hex(st.PinnedKey[:])
				}
				out["attested"] = st.Attested
				if st.Attested {
					chain, err := c.AttestationChain()
					if err != nil {
						return fmt.Errorf("%s: %w", path, err)
					}
					cert, err := x509.ParseCertificate(chain[0])
					if err != nil {
						return fmt.Errorf("%s: card certificate: %w", path, err)
					}
					out["attestation_subject"] = cert.Subject.String()
				}
				if err := enc.Encode(out); err != nil {
					return err
				}
			}
			return nil
		},
	}
}

func pcscdCmd() *cobra.Command {
	var dir string
	var port int
	c := &cobra.Command{
		Use:   "pcscd",
		Short: "Run a private pcscd with two vpcd slots until interrupted",
		Long: `Start pcscd in its own mount namespace (root, or a user namespace) with a
private reader configuration: two vpcd slots on --port and --port+1
(0: two free ports). It does not touch a system pcscd. Prints the
environment line that points PC/SC clients at it and the slots' addresses
and reader names, then runs until SIGINT/SIGTERM.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			d, err := pcscd.Start(cmd.Context(), dir, port)
			if err != nil {
				return err
			}
			defer d.Stop()
			out := cmd.OutOrStdout()
			fmt.Fprintln(out, d.Env())
			for i := range pcscd.Slots {
				fmt.Fprintf(out, "slot %d: %s %q\n", i, d.Addr(i), d.ReaderName(i))
			}
			<-cmd.Context().Done()
			return nil
		},
	}
	c.Flags().StringVar(&dir, "dir", "", "directory for the socket, config and log (required; keep the path short)")
	c.Flags().IntVar(&port, "port", 0, "TCP port of vpcd slot 0 (0: pick free ports)")
	c.MarkFlagRequired("dir")
	return c
}

func authenticateCmd() *cobra.Command {
	var challenge, issuerURL, ca, tokenFile, cert, key string
	var asJSON bool
	c := &cobra.Command{
		Use:   "authenticate (--challenge HEX CARD.json | --issuer URL [--ca F] (--token-file F | --cert F --key F) CARD.json...)",
		Short: "Have a locked card answer a challenge: locally, or through the issuer's API",
		Long: `Act as a terminal for the card whose state is in CARD.json (docs/PROTOCOL.md §4).

Local mode (--challenge): SELECT, then AUTHENTICATE with the 16-byte
challenge; print the card's AES-CMAC answer in hex. The issuer checks it
with issuer cards verify.

Issuer mode (--issuer): for each card, ask the issuer's API for a challenge
for the card's Id (POST /v1/cards/{id}/challenge), have the card answer,
and post the MAC (POST /v1/cards/{id}/verify), where the issuer's token
checks it. Credentials of the verifier role: --token-file (a bearer token)
or --cert/--key (a client certificate whose subject OU is "verifier");
--ca is the CA of the issuer's TLS certificate. One line per card:

  ID ok                      the MAC verified
  ID failed N                wrong MAC (or a challenge the issuer refused); N failures in a row
  ID blocked N               wrong MAC, and the limit is reached: the card is now blocked
  ID refused N               the card was already blocked or in conflict
  ID not-active              the issuer gives the card no challenge (blocked or in conflict)

(--json: one JSON object per card instead.) The exit status is 0 only if
every card's MAC verified.`,
		Example: `  vcard authenticate --challenge $(openssl rand -hex 16) cards/card-B100000000000001.json
  vcard authenticate --issuer https://issuer.internal:8443 --ca server.pem \
      --token-file verifier.token cards/*.json`,
		Args: func(cmd *cobra.Command, args []string) error {
			switch {
			case (challenge == "") == (issuerURL == ""):
				return errors.New("give either --challenge (local) or --issuer (through the issuer's API)")
			case challenge != "" && len(args) != 1:
				return fmt.Errorf("--challenge takes exactly one CARD.json, got %d", len(args))
			case len(args) == 0:
				return errors.New("name at least one CARD.json")
			}
			return nil
		},
	}
	f := c.Flags()
	f.StringVar(&challenge, "challenge", "", "local mode: the issuer's challenge, 32 hex digits")
	f.StringVar(&issuerURL, "issuer", "", "issuer mode: the issuer API's base URL, https://host:port")
	f.StringVar(&ca, "ca", "", "issuer mode: CA certificate(s) (PEM) of the issuer's TLS certificate")
	f.StringVar(&tokenFile, "token-file", "", "issuer mode: file holding a bearer token of the verifier role")
	f.StringVar(&cert, "cert", "", "issuer mode: client certificate (PEM), subject OU verifier")
	f.StringVar(&key, "key", "", "issuer mode: client private key (PEM)")
	f.BoolVar(&asJSON, "json", false, "issuer mode: one JSON object per card")
	c.RunE = func(cmd *cobra.Command, args []string) error {
		if issuerURL != "" {
			return authenticateIssuer(cmd, issuerURL, ca, tokenFile, cert, key, asJSON, args)
		}
		ch, err := hex.DecodeString(challenge)
		if err != nil || len(ch) != protocol.ChallengeLen {
			return fmt.Errorf("--challenge must be %d bytes of hex, got %q", protocol.ChallengeLen, challenge)
		}
		a, err := card.Open(args[0])
		if err != nil {
			return err
		}
		c := &card.Client{T: a.Local()}
		if err := c.Select(); err != nil {
			return err
		}
		mac, err := c.Authenticate(ch)
		if err != nil {
			return fmt.Errorf("%s: %w", args[0], err)
		}
		fmt.Fprintf(cmd.OutOrStdout(), "%x\n", mac)
		return nil
	}
	return c
}

// authenticateIssuer runs issuer mode over every card and fails unless
// every MAC verified.
func authenticateIssuer(cmd *cobra.Command, url, ca, tokenFile, cert, key string, asJSON bool, cards []string) error {
	cl, err := api.NewClient(api.Config{URL: url, CAFile: ca, TokenFile: tokenFile, CertFile: cert, KeyFile: key})
	if err != nil {
		return err
	}
	out := cmd.OutOrStdout()
	enc := json.NewEncoder(out)
	bad := 0
	for _, path := range cards {
		res, err := vcard.Authenticate(cmd.Context(), cl, path)
		if err != nil {
			return err
		}
		if !res.OK() {
			bad++
		}
		switch {
		case asJSON:
			if err := enc.Encode(res); err != nil {
				return err
			}
		case res.OK() || res.Result == vcard.ResultNotActive:
			fmt.Fprintf(out, "%x %s\n", []byte(res.ID), res.Result)
		default:
			fmt.Fprintf(out, "%x %s %d\n", []byte(res.ID), res.Result, res.FailedAuth)
		}
	}
	if bad > 0 {
		return fmt.Errorf("%d of %d cards did not authenticate", bad, len(cards))
	}
	return nil
}
