// Command receiver plays the receiving system's HSM for the export of
// card keys (docs/EXPORT.md): it makes the key-transport key and sends it
// to the issuer's key-import key, imports an export file into its token
// and verifies cards' MACs there. It is the issuer's counterpart for
// tests and for a partner's integration, built on package receiver.
package main

import (
	"context"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"os/signal"
	"syscall"

	"github.com/spf13/cobra"

	"blindperso/export"
	"blindperso/hsm"
	"blindperso/protocol"
	"blindperso/receiver"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	err := root().ExecuteContext(ctx)
	stop()
	if err != nil {
		os.Exit(1)
	}
}

const tokenHelp = `--token is the receiver's token as an RFC 7512 PKCS#11 URI (or
$RECEIVER_TOKEN), its PIN from pin-source=file: or env:, as for the
issuer (docs/HSM.md).`

func root() *cobra.Command {
	c := &cobra.Command{
		Use:   "receiver",
		Short: "The receiving HSM's side of an export of card keys (docs/EXPORT.md)",
		Long: `receiver makes a key-transport key (KTK) in its token and sends it to the
issuer wrapped under the issuer's key-import key, imports the issuer's
export file into its token (every K_I sensitive, never extractable, able
to verify a MAC and nothing else), and verifies a card's MAC with it.

` + tokenHelp,
		SilenceUsage: true,
	}
	c.AddCommand(ktkCmd(), importCmd(), verifyCmd())
	return c
}

func tokenFlag(c *cobra.Command) func() (*hsm.Token, error) {
	uri := c.Flags().String("token", "", "PKCS#11 URI of the receiver's token (default $RECEIVER_TOKEN)")
	return func() (*hsm.Token, error) {
		u := *uri
		if u == "" {
			u = os.Getenv("RECEIVER_TOKEN")
		}
		if u == "" {
			return nil, errors.New("no token: give --token URI or set RECEIVER_TOKEN")
		}
		return hsm.OpenURI(u, 1)
	}
}

func ktkCmd() *cobra.Command {
	var label, pubFile, out string
	c := &cobra.Command{
		Use:   "ktk --token URI --label L --key-import PUB.pem --out KTK.pem",
		Short: "Make a KTK and write it wrapped to the issuer's key-import key",
		Long: `Generates an AES-256 KTK labelled L in the token, wraps it there to the
issuer's key-import public key (RSA-OAEP SHA-1, the PEM the issuer's key
ceremony exported), writes the wrapped KTK to --out as a PEM block
"` + export.KTKPEMType + `", and then makes the KTK non-extractable: it
can never leave the token again. Check the key-import key's fingerprint
(printed) with the issuer out of band before sending the file; the
issuer's ceremony imports it and prints the KTK's check value, which
must equal the one printed here where both tokens give one.

` + tokenHelp,
		Args: cobra.NoArgs,
	}
	open := tokenFlag(c)
	c.Flags().StringVar(&label, "label", "", "label of the new KTK")
	c.Flags().StringVar(&pubFile, "key-import", "", "the issuer's key-import public key (PEM)")
	c.Flags().StringVar(&out, "out", "", "file for the wrapped KTK (not overwritten)")
	c.RunE = func(c *cobra.Command, _ []string) error {
		if label == "" || pubFile == "" || out == "" {
			return errors.New("give --label, --key-import and --out")
		}
		pemBytes, err := os.ReadFile(pubFile)
		if err != nil {
			return err
		}
		pub, err := protocol.ParseIssuerKeyPEM(pemBytes)
		if err != nil || pub.RSA == nil {
			return fmt.Errorf("%s: not an RSA public key: %v", pubFile, err)
		}
		if _, err := os.Lstat(out); err == nil {
			return fmt.Errorf("%s exists: not overwritten", out)
		}
		tok, err := open()
		if err != nil {
			return err
		}
		defer tok.Close()
		k, err := receiver.MakeKTK(c.Context(), tok, label, pub.RSA)
		if err != nil {
			return err
		}
		if err := os.WriteFile(out, export.MarshalWrappedKTK(k.Wrapped), 0o644); err != nil {
			return err
		}
		fp := pub.Fingerprint()
		cv := "not given by this token"
		if k.CheckValue != nil {
			cv = hex.EncodeToString(k.CheckValue)
		}
		fmt.Fprintf(c.OutOrStdout(), "KTK %q made; wrapped to the key-import key %x in %s; check value %s\n", label, fp[:], out, cv)
		return nil
	}
	return c
}

func importCmd() *cobra.Command {
	var ktk string
	c := &cobra.Command{
		Use:   "import --token URI --ktk L EXPORT.manifest.json",
		Short: "Import an issuer's export file into the token",
		Long: `Reads the export file named by the manifest and unwraps every K_I under
the KTK L into a private token object labelled card-<id> (sensitive,
never extractable, verify only). A line that does not parse, whose
wrapped key the token refuses (RFC 3394's integrity check), or whose
check value differs, is refused with its reason on stderr; the others
land. A file that differs from its manifest is reported after every line
was tried (exit 1). Re-running is safe: keys already in the token are
left as they are.

` + tokenHelp,
		Args: cobra.ExactArgs(1),
	}
	open := tokenFlag(c)
	c.Flags().StringVar(&ktk, "ktk", "", "label of the KTK the file is wrapped under")
	c.RunE = func(c *cobra.Command, args []string) error {
		if ktk == "" {
			return errors.New("give --ktk")
		}
		tok, err := open()
		if err != nil {
			return err
		}
		defer tok.Close()
		_, imported, refused, err := receiver.Import(c.Context(), tok, ktk, args[0], func(r receiver.Result) {
			if r.Err != nil {
				fmt.Fprintf(c.ErrOrStderr(), "line %d (card %x): refused: %v\n", r.Line, r.ID, r.Err)
			}
		})
		fmt.Fprintf(c.OutOrStdout(), "%d imported, %d refused\n", imported, refused)
		if err == nil && refused > 0 {
			err = fmt.Errorf("%d lines refused", refused)
		}
		return err
	}
	return c
}

func verifyCmd() *cobra.Command {
	var id, challenge, mac protocol.Hex
	c := &cobra.Command{
		Use:   "verify --token URI --id HEX --challenge HEX --mac HEX",
		Short: "Verify a card's MAC over a challenge with its imported key, in the token",
		Long: `Prints "ok" (exit 0) or "FAILED" (exit 1). The MAC is the card's answer
to the challenge (docs/PROTOCOL.md §4: AES-CMAC under K_I).

` + tokenHelp,
		Args: cobra.NoArgs,
	}
	open := tokenFlag(c)
	c.Flags().Var(hexFlag{&id}, "id", "the card's Id (hex)")
	c.Flags().Var(hexFlag{&challenge}, "challenge", "the challenge (hex)")
	c.Flags().Var(hexFlag{&mac}, "mac", "the card's MAC (hex)")
	c.RunE = func(c *cobra.Command, _ []string) error {
		tok, err := open()
		if err != nil {
			return err
		}
		defer tok.Close()
		ok, err := receiver.Verify(c.Context(), tok, id, challenge, mac)
		if err != nil {
			return err
		}
		if !ok {
			fmt.Fprintln(c.OutOrStdout(), "FAILED")
			return errors.New("the MAC does not verify")
		}
		fmt.Fprintln(c.OutOrStdout(), "ok")
		return nil
	}
	return c
}

// hexFlag is a pflag.Value of hex bytes.
type hexFlag struct{ v *protocol.Hex }

func (h hexFlag) String() string {
	if h.v == nil {
		return ""
	}
	return hex.EncodeToString(*h.v)
}
func (h hexFlag) Set(s string) error { return h.v.UnmarshalText([]byte(s)) }
func (h hexFlag) Type() string       { return "hex" }
